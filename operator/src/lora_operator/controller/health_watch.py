"""Health watch (pure): one reading of the rank-0 trainer's `/health` -> status and Degraded.

The operator's timer reads `/health` (see handlers.py) and hands the outcome here as a
`Probe`: the JSON body, or the kind of error. From it and the previous status this module
derives `status.progress`, `status.metrics`, `status.health` and the Degraded condition:

- trainer-side rules: Degraded while the verdict is Degraded or Critical; reason = the most
  severe firing rule (the trainer lists it first), message = its evidence;
- Stalled (operator-side): the step has not advanced for spec.health.stallTimeoutSeconds
  while the job runs. The clock starts at the later of the last step change and the time the
  job last started running, so a suspension pauses it and an operator restart keeps it
  (both times are in status);
- an unreachable or garbled `/health` gives health Unknown and leaves Degraded as it was:
  a failed read never marks a job Degraded (nor clears it).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lora_operator.api import constants as c
from lora_operator.api.spec import LoRAFineTuneSpec

DEGRADED_VERDICTS = (c.VERDICT_DEGRADED, c.VERDICT_CRITICAL)
MAX_EVIDENCE_RULES = 8
MAX_MESSAGE = 1024
ERROR_KINDS = ("unreachable", "timeout", "http_status", "malformed")
_RANK = {c.VERDICT_WARNING: 1, c.VERDICT_DEGRADED: 2, c.VERDICT_CRITICAL: 3}


@dataclass(frozen=True)
class Probe:
    """One read of `/health`: BODY on success, else ERROR (a kind of ERROR_KINDS) + DETAIL."""

    body: Mapping[str, Any] | None = None
    error: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class Degradation:
    """Why the job is Degraded: the rule, its evidence message, the step it fired since."""

    rule: str
    message: str
    since_step: int | None


@dataclass(frozen=True)
class HealthOutcome:
    """What a probe changes: status fields to write; the Degraded state (None: unchanged)."""

    status: dict[str, Any]
    degraded: Degradation | None
    known: bool  # False: the read failed, leave Degraded as it was


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def parse_body(body: Any) -> dict[str, Any] | None:
    """The fields the operator uses from a `/health` body; None when it is not one."""
    if not isinstance(body, Mapping):
        return None
    verdict, step = body.get("verdict"), _int(body.get("step"))
    rules = body.get("rules")
    if verdict not in c.VERDICTS or step is None or not isinstance(rules, list):
        return None
    firing = []
    for rule in rules[:MAX_EVIDENCE_RULES]:
        if not isinstance(rule, Mapping) or rule.get("rule") not in c.RULE_NAMES:
            return None
        severity = rule.get("severity")
        if severity not in c.SEVERITIES:
            return None
        evidence = rule.get("evidence")
        firing.append(
            {
                "rule": rule["rule"],
                "severity": severity,
                "sinceStep": _int(rule.get("since_step")) or 0,
                "message": str(rule.get("message") or "")[:MAX_MESSAGE],
                "evidence": _compact(evidence) if isinstance(evidence, Mapping) else {},
            }
        )
    raw_metrics = body.get("metrics")
    metrics: Mapping[str, Any] = raw_metrics if isinstance(raw_metrics, Mapping) else {}
    return {
        "verdict": verdict,
        "step": step,
        "rules": firing,
        "total_steps": _int(body.get("total_steps")),
        "epoch": _number(body.get("epoch")),
        "eta_seconds": _number(body.get("eta_seconds")),
        "metrics": {k: _number(metrics.get(k)) for k in _METRICS},
    }


_METRICS = {  # /health metrics key -> status.metrics key
    "loss": "loss",
    "eval_loss": "evalLoss",
    "bleu": "bleu",
    "rouge_l": "rougeL",
    "tokens_per_second": "tokensPerSecond",
}


def _compact(evidence: Mapping[str, Any], depth: int = 0) -> dict[str, Any]:
    """Evidence kept small and strict-JSON: scalars, short strings, short lists, 3 levels."""
    out: dict[str, Any] = {}
    for key, value in list(evidence.items())[:16]:
        kept = _compact_value(value, depth)
        if kept is not None:
            out[str(key)] = kept
    return out


def _compact_value(value: Any, depth: int) -> Any:
    """VALUE made small (None: dropped; a null would delete the key in a merge patch)."""
    if isinstance(value, Mapping):
        return _compact(value, depth + 1) if depth < 2 else None
    if isinstance(value, list):
        items = [_compact_value(v, depth + 1) for v in value[:5]]
        return [v for v in items if v is not None]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value[:256]
    if isinstance(value, int | float | bool):
        return value
    return None


def assess(
    spec: LoRAFineTuneSpec,
    old: Mapping[str, Any],
    probe: Probe,
    running_since: str | None,
    now: str,
    judge_stall: bool = True,
) -> HealthOutcome:
    """The status after PROBE (see the module docstring). RUNNING_SINCE: when the job last
    started running (the Running condition's transition time). JUDGE_STALL False for the
    final verdict of a finished job."""
    old_health = dict(old.get("health") or {})
    parsed = parse_body(probe.body) if probe.body is not None else None
    if parsed is None:
        detail = probe.detail or "not a /health body"
        kind = probe.error or "malformed"
        health = {
            **{k: v for k, v in old_health.items() if k in ("step",)},
            "verdict": c.VERDICT_UNKNOWN,
            "reason": None,
            "rulesFiring": [],
            "lastCheckTime": now,
            "message": f"cannot read the trainer's /health ({kind}): {detail}"[:MAX_MESSAGE],
        }
        return HealthOutcome({"health": health}, None, known=False)
    old_progress = dict(old.get("progress") or {})
    step = parsed["step"]
    advanced = step != old_progress.get("step") or not old_progress.get("lastStepTime")
    total = parsed["total_steps"]
    progress: dict[str, Any] = {
        "step": step,
        "totalSteps": total,
        "percent": round(min(100.0, 100.0 * step / total), 1) if total else None,
        "epoch": parsed["epoch"],
        "etaSeconds": parsed["eta_seconds"],
        "lastStepTime": now if advanced else old_progress["lastStepTime"],
    }
    metrics = dict(old.get("metrics") or {})
    for key, field in _METRICS.items():
        if parsed["metrics"][key] is not None:
            metrics[field] = parsed["metrics"][key]
    rules = list(parsed["rules"])
    stall = (
        _stall(spec, progress["lastStepTime"], running_since, now, step) if judge_stall else None
    )
    if stall is not None:
        rules.append(stall)
    degraded = next((r for r in rules if r["severity"] in DEGRADED_VERDICTS), None)
    verdict = parsed["verdict"]
    if stall is not None and _RANK.get(stall["severity"], 0) > _RANK.get(verdict, 0):
        verdict = stall["severity"]
    top = rules[0] if rules else None
    health = {
        "verdict": verdict,
        "reason": top["rule"] if top else None,
        "step": step,
        "rulesFiring": rules,
        "lastCheckTime": now,
        "message": _summary(verdict, rules, step),
    }
    status = {"progress": progress, "metrics": metrics, "health": health}
    if degraded is None:
        return HealthOutcome(status, None, known=True)
    message = f"step {step}: {degraded['message']}"[:MAX_MESSAGE]
    return HealthOutcome(
        status, Degradation(degraded["rule"], message, degraded["sinceStep"]), known=True
    )


def _stall(
    spec: LoRAFineTuneSpec,
    last_step_time: str | None,
    running_since: str | None,
    now: str,
    step: int,
) -> dict[str, Any] | None:
    """The Stalled rule (operator-side), firing or None."""
    timeout = spec.health.stall_timeout_seconds
    override = next((r for r in spec.health.rules if r.name == c.RULE_STALLED), None)
    if override is not None and not override.enabled:
        return None
    starts = [t for t in (parse_time(last_step_time), parse_time(running_since)) if t]
    current = parse_time(now)
    if not starts or current is None:
        return None
    idle = (current - max(starts)).total_seconds()
    if idle < timeout:
        return None
    severity = (override.severity if override is not None else None) or c.RULE_DEFAULT_SEVERITY[
        c.RULE_STALLED
    ]
    return {
        "rule": c.RULE_STALLED,
        "severity": severity,
        "sinceStep": step,
        "message": f"no step progress for {idle:.0f} s (at step {step}; "
        f"spec.health.stallTimeoutSeconds {timeout})",
        "evidence": {"step": step, "idle_seconds": round(idle), "timeout_seconds": timeout},
    }


def _summary(verdict: str, rules: list[dict[str, Any]], step: int) -> str:
    if not rules:
        return f"{verdict} at step {step}"
    named = ", ".join(f"{r['rule']} ({r['severity']})" for r in rules)
    return f"{verdict} at step {step}: {named}"[:MAX_MESSAGE]
