"""Pre-flight report pieces shared by `lora-train --preflight` and `lora-operator preflight`
(pure): statuses and their exit codes, the health rules as pre-flight checks, the table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lora_operator.api import constants as c
from lora_operator.health.catalog import RULES_BY_NAME
from lora_operator.health.config import HealthConfig
from lora_operator.health.window import Finding, Window

PASS, WARN, FAIL = "pass", "warn", "fail"
RANK = {PASS: 0, WARN: 1, FAIL: 2}
EXIT_CODES = {
    PASS: c.EXIT_VERDICT_HEALTHY,
    WARN: c.EXIT_VERDICT_WARNING,
    FAIL: c.EXIT_VERDICT_DEGRADED,
}


def rule_check(name: str, config: HealthConfig, window: Window) -> dict[str, str]:
    """One rule (StaticConfig, DataQuality) as a check row, with spec.health's switch,
    threshold and severity: a Warning finding warns, a Degraded/Critical one fails."""
    rule, settings = RULES_BY_NAME[name], config.settings(name)
    label = f"rule {name}"
    if not settings.enabled or rule.check is None:
        return {
            "name": label,
            "status": PASS,
            "measured": "disabled",
            "expected": "-",
            "message": "",
        }
    threshold = rule.threshold if settings.threshold is None else settings.threshold
    expected = _expectation(name, threshold)
    outcome = rule.check(window, threshold)
    if not isinstance(outcome, Finding):
        return {
            "name": label,
            "status": PASS,
            "measured": "no finding",
            "expected": expected,
            "message": "",
        }
    severity = settings.severity or rule.severity
    return {
        "name": label,
        "status": WARN if severity == c.VERDICT_WARNING else FAIL,
        "measured": outcome.message,
        "expected": expected,
        "message": f"{severity}: {outcome.message}; see docs/runbooks/{name}.md",
    }


def _expectation(name: str, threshold: float) -> str:
    if name == c.RULE_STATIC_CONFIG:
        return f"alpha/sqrt(r) >= {threshold:g}, warmup < total, lr > 0"
    return f"pad labels <= {threshold:.0%}, every sample supervised"


def render_table(report: Mapping[str, Any]) -> str:
    """The pass/fail table of a report (or its JSON form); messages under warn/fail rows."""
    checks: Sequence[Mapping[str, str]] = report["checks"]
    heads = ("STATUS", "CHECK", "MEASURED", "EXPECTED")
    rows = [(ch["status"].upper(), ch["name"], ch["measured"], ch["expected"]) for ch in checks]
    widths = [max([len(heads[i])] + [len(r[i]) for r in rows]) for i in range(3)] + [0]
    lines = [f"preflight {report.get('name') or ''}".rstrip()]
    lines.append("  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip())
    for check, row in zip(checks, rows, strict=True):
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        if check["status"] != PASS and check.get("message"):
            lines.append(f"        -> {check['message']}")
    lines += [f"skipped: {s}" for s in report.get("skipped", [])]
    lines += [f"note: {n}" for n in report.get("notes", [])]
    lines.append(f"verdict: {str(report['verdict']).upper()} (exit {report['exit_code']})")
    return "\n".join(lines)


TERMINATION_MESSAGE_LIMIT = 4096  # bytes the kubelet keeps of a termination message


def summary_message(report: Mapping[str, Any], limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
    """The verdict and every warn/fail check with its fix, in one short text.

    What a pre-flight pod writes to its termination log, and what the operator puts in the
    PreflightPassed condition: `fail: adapter: adapted modules: 0 (expected 8 ...) -> fix; ...`.
    """
    verdict = str(report["verdict"])
    parts = [
        f"{ch['name']}: {ch['measured']} (expected {ch['expected']})"
        + (f" -> {ch['message']}" if ch.get("message") else "")
        for ch in sorted(report["checks"], key=lambda ch: -RANK[ch["status"]])
        if ch["status"] != PASS
    ]
    parts += [f"skipped: {s}" for s in report.get("skipped", [])]
    text = f"{verdict}: " + ("; ".join(parts) if parts else "every check passed")
    data = text.encode()
    if len(data) > limit:
        text = data[: limit - 3].decode(errors="ignore") + "..."
    return text
