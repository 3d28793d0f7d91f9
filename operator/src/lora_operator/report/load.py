"""A run's output directory, read for the report: trace records, verdicts, summary.

Training and eval records go through the health rules' own parser (health.records); the
verdict records the trainer wrote (`{"step", "health": {...}}`) are kept as they are, or
replaced by a replay of the rules over the trace when a spec is given.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_operator.api import constants as c
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.health import HealthConfig, RecordError, parse_record, replay
from lora_operator.health.records import Record, as_int
from lora_operator.validation import SpecFileError, health_config_of_file

TRACE = "trace.jsonl"
SUMMARY = "summary.json"
DATA_STATS = "data_stats.json"
SEVERITY_RANK = {c.VERDICT_WARNING: 1, c.VERDICT_DEGRADED: 2, c.VERDICT_CRITICAL: 3}

SpecLike = Path | str | HealthConfig | LoRAFineTuneSpec


class ReportError(Exception):
    """The run cannot be reported on (the message names the file)."""


@dataclass(frozen=True)
class Finding:
    """A rule that fired: where it started and what it said then."""

    rule: str
    severity: str
    step: int
    message: str
    evidence: Mapping[str, Any] = field(default_factory=dict)

    @property
    def headline(self) -> str:
        return f"{self.rule} from step {self.step}: {self.message}"


@dataclass(frozen=True)
class VerdictChange:
    """The verdict and the firing rules from `step` on."""

    step: int
    verdict: str
    rules: tuple[str, ...]


@dataclass(frozen=True)
class Health:
    """The verdict over the run, from the trace's verdict records or a replay."""

    source: str  # "trace" or "replay"
    changes: tuple[VerdictChange, ...]
    findings: tuple[Finding, ...]  # first firing per rule, earliest first

    @property
    def verdict(self) -> str:
        return self.changes[-1].verdict if self.changes else c.VERDICT_UNKNOWN

    @property
    def main_finding(self) -> Finding | None:
        """The first Degraded/Critical rule (then the first Warning); None when none fired."""
        ranked = sorted(
            self.findings, key=lambda f: (-min(SEVERITY_RANK.get(f.severity, 0), 2), f.step)
        )
        return ranked[0] if ranked else None

    @property
    def headline(self) -> str:
        main = self.main_finding
        if main is None:
            return "Healthy: no rule fired"
        return main.headline if main.severity != c.VERDICT_WARNING else f"Warning: {main.headline}"


@dataclass(frozen=True)
class Run:
    """Everything the report shows about one output directory."""

    output_dir: Path
    records: tuple[Record, ...]  # training and eval records, in trace order
    raw: tuple[Mapping[str, Any], ...]  # the same records as written (update ratios etc.)
    health: Health
    summary: Mapping[str, Any] | None
    data_stats: Mapping[str, Any] | None
    warnings: tuple[str, ...]

    @property
    def last_step(self) -> int:
        return max((r.step for r in self.records), default=0)


def load_run(output_dir: Path, spec: SpecLike | None = None) -> Run:
    """Read OUTPUT_DIR/trace.jsonl (+ summary.json, data_stats.json); ReportError if unusable."""
    trace = output_dir / TRACE
    records, raw, verdicts, warnings = read_trace(trace)
    stats = _read_json(output_dir / DATA_STATS)
    if spec is None:
        health = health_of_verdict_records(verdicts)
    else:
        timeline = replay(records, health_config(spec), stats)
        health = Health(
            "replay",
            tuple(VerdictChange(t.step, t.verdict, tuple(t.rules)) for t in timeline.transitions),
            tuple(
                Finding(e.rule, e.severity, e.first_firing_step, e.message, e.evidence)
                for e in timeline.rules
            ),
        )
    summary = _read_json(output_dir / SUMMARY)
    return Run(output_dir, tuple(records), tuple(raw), health, summary, stats, tuple(warnings))


def read_trace(
    path: Path,
) -> tuple[list[Record], list[Mapping[str, Any]], list[Mapping[str, Any]], list[str]]:
    """Training/eval records (parsed and raw), verdict records, a warning per skipped line."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ReportError(f"cannot read {path}: {err.strerror or err}") from err
    records: list[Record] = []
    raw: list[Mapping[str, Any]] = []
    verdicts: list[Mapping[str, Any]] = []
    warnings: list[str] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line.decode("utf-8"))
            if isinstance(value, dict) and isinstance(value.get("health"), dict):
                verdicts.append(value)
                continue
            records.append(parse_record(value, number))
            raw.append(value)
        except (UnicodeDecodeError, json.JSONDecodeError, RecordError) as err:
            warnings.append(f"{path}:{number}: skipped: {err}")
    if not any(r.is_training for r in records):
        first = f"; first problem: {warnings[0]}" if warnings else ""
        raise ReportError(f"{path}: no training records ({len(warnings)} line(s) skipped){first}")
    return records, raw, verdicts, warnings


def health_of_verdict_records(verdicts: Sequence[Mapping[str, Any]]) -> Health:
    changes: list[VerdictChange] = []
    first: dict[str, Finding] = {}
    for value in verdicts:
        health = value["health"]
        step = as_int(health.get("step", value.get("step"))) or 0
        rules = [r for r in health.get("rules") or [] if isinstance(r, Mapping)]
        names = tuple(str(r.get("rule")) for r in rules)
        changes.append(VerdictChange(step, str(health.get("verdict", c.VERDICT_UNKNOWN)), names))
        for rule in rules:
            name = str(rule.get("rule"))
            if name not in first:
                since = as_int(rule.get("since_step"))
                evidence = rule.get("evidence")
                first[name] = Finding(
                    name,
                    str(rule.get("severity", c.RULE_DEFAULT_SEVERITY.get(name, "Warning"))),
                    step if since is None else since,
                    str(rule.get("message", "")),
                    evidence if isinstance(evidence, Mapping) else {},
                )
    findings = sorted(first.values(), key=lambda f: f.step)  # stable: most severe first
    return Health("trace", tuple(changes), tuple(findings))


def health_config(spec: SpecLike) -> HealthConfig:
    """The rules' configuration from a config, a spec model or a manifest file."""
    if isinstance(spec, HealthConfig):
        return spec
    if isinstance(spec, LoRAFineTuneSpec):
        return HealthConfig.from_spec(spec.health, spec.training, spec.lora)
    try:
        return health_config_of_file(Path(spec))
    except SpecFileError as err:
        raise ReportError(str(err)) from err


def _read_json(path: Path) -> Mapping[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ReportError(f"cannot read {path}: {err}") from err
    return value if isinstance(value, dict) else None
