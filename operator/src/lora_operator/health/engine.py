"""HealthEngine: feed trace records one at a time, read the current verdict and its evidence.

Evaluations happen on the first training record at or after step 1, then at every multiple
of spec.health.evaluationIntervalSteps (on the first training record at or past it).
A training record whose step is not after the last accepted one (a resumed run re-appends
the steps after its checkpoint, docs/trace-schema.md; or a record out of order) is ignored
with a warning until the trace passes the last accepted step again; the rules' state carries
on across the resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lora_operator.api import constants as c
from lora_operator.health.catalog import RULES
from lora_operator.health.config import HealthConfig
from lora_operator.health.records import Record, RecordError, parse_record
from lora_operator.health.rules import Rule
from lora_operator.health.stream import StreamState
from lora_operator.health.window import NoData, Window

_RANK = {
    c.VERDICT_UNKNOWN: -1,
    c.VERDICT_HEALTHY: 0,
    **{s: i + 1 for i, s in enumerate(c.SEVERITIES)},
}


def worse(a: str, b: str) -> str:
    """The more severe of two verdicts (Unknown ranks below Healthy)."""
    return a if _RANK[a] >= _RANK[b] else b


@dataclass
class RuleState:
    """One rule's state across evaluations."""

    name: str
    severity: str
    streak: int = 0
    firing: bool = False
    since_step: int | None = None
    condition_since_step: int | None = None
    message: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    first_firing_step: int | None = None
    first_condition_step: int | None = None
    first_message: str = ""
    first_evidence: dict[str, Any] = field(default_factory=dict)
    cleared_step: int | None = None
    last_firing_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.name,
            "severity": self.severity,
            "since_step": self.since_step,
            "last_firing_step": self.last_firing_step,
            "message": self.message,
            "evidence": self.evidence,
        }


@dataclass(frozen=True)
class Transition:
    step: int
    verdict: str
    rules: tuple[str, ...]


class HealthEngine:
    """The rules over a stream of records; pure (no I/O): warnings are collected, not logged."""

    def __init__(self, config: HealthConfig | None = None) -> None:
        self.config = config or HealthConfig()
        self.rules: list[Rule] = [
            rule
            for rule in RULES
            if rule.check is not None and self.config.settings(rule.name).enabled
        ]
        self.states = {
            rule.name: RuleState(
                rule.name, self.config.settings(rule.name).severity or rule.severity
            )
            for rule in self.rules
        }
        self.stream = StreamState()
        self.data_stats: Mapping[str, Any] | None = None
        self.warnings: list[str] = []
        self.transitions: list[Transition] = []
        self.step = 0
        self.evaluations = 0
        self.grace_end_step: int | None = None
        self.worst_verdict = c.VERDICT_UNKNOWN
        self._last_training_step = -1
        self._last_eval_step = -1
        self._next_evaluation = 1
        self._ignoring: tuple[int, int] | None = None  # (first ignored step, count)
        self._restart_step: int | None = None  # first step of the latest re-appended run

    @property
    def verdict(self) -> str:
        if not self.evaluations:
            return c.VERDICT_UNKNOWN
        verdict = c.VERDICT_HEALTHY
        for state in self.firing:
            verdict = worse(state.severity, verdict)
        return verdict

    @property
    def firing(self) -> list[RuleState]:
        return [s for s in self.states.values() if s.firing]

    def observe_data_stats(self, stats: Mapping[str, Any]) -> None:
        """The trainer's data statistics (data_stats.json) for the DataQuality rule."""
        self.data_stats = stats

    def observe(self, raw: Record | Mapping[str, Any], line: int | None = None) -> bool:
        """Take one record; True when it triggered an evaluation. Never raises on bad input."""
        try:
            record = raw if isinstance(raw, Record) else parse_record(raw, line)
        except RecordError as err:
            self.warnings.append(f"{_where(line)}skipped: {err}")
            return False
        evaluated = self._observe_training(record) if record.is_training else False
        if record.is_eval:
            self._observe_eval(record)
        return evaluated

    def _observe_training(self, record: Record) -> bool:
        if record.step <= self._last_training_step:
            self._ignore(record, self._last_training_step)
            return False
        self._end_ignoring()
        self._last_training_step = self.step = record.step
        self.stream.add_training(record, self._restart_step)
        self._update_grace(record.step)
        if record.step < self._next_evaluation:
            return False
        self._evaluate(record.step)
        interval = self.config.evaluation_interval_steps
        self._next_evaluation = (record.step // interval + 1) * interval
        return True

    def _observe_eval(self, record: Record) -> None:
        if record.step <= self._last_eval_step:
            self._ignore(record, self._last_eval_step)
            return
        self._last_eval_step = record.step
        self.stream.add_eval(record)

    def _ignore(self, record: Record, last: int) -> None:
        if self._ignoring is None:
            self._ignoring = (record.step, 0)
            self._restart_step = record.step
            self.warnings.append(
                f"{_where(record.line)}step {record.step} is not after step {last}: ignoring "
                f"records up to step {last} (a resumed run re-appends the steps after its "
                "checkpoint, or the record is out of order)"
            )
        first, count = self._ignoring
        self._ignoring = (first, count + 1)

    def _end_ignoring(self) -> None:
        if self._ignoring is not None:
            first, count = self._ignoring
            self.warnings.append(f"ignored {count} record(s) from step {first} on")
            self._ignoring = None

    def _update_grace(self, step: int) -> None:
        if self.grace_end_step is not None:
            return
        cfg = self.config
        if step >= cfg.grace_step_cap or self.stream.lr_sum_b >= cfg.grace_lr_sum:
            self.grace_end_step = step

    def _window(self, step: int) -> Window:
        s = self.stream
        return Window(
            step=step,
            config=self.config,
            telemetry=s.telemetry,
            grace_over=self.grace_end_step is not None,
            lr_sum_b=s.lr_sum_b,
            prior_lr_sum=s.prior_lr_sum,
            a_init=s.a_init,
            nan_loss_steps=s.nan_loss_steps,
            nonfinite_streak=s.nonfinite_peak,
            empty_streak=s.empty_peak,
            lr_seen=s.lr_seen,
            lr_positive_seen=s.lr_positive_seen,
            evals=s.evals,
            data_stats=self.data_stats,
        )

    def _evaluate(self, step: int) -> None:
        before = (self.verdict, tuple(s.name for s in self.firing))
        window = self._window(step)
        for rule in self.rules:
            self._apply(rule, window)
        self.evaluations += 1
        self.stream.end_window()
        after = (self.verdict, tuple(s.name for s in self.firing))
        if after != before:
            self.transitions.append(Transition(step, *after))
        self.worst_verdict = worse(self.worst_verdict, after[0])

    def _apply(self, rule: Rule, window: Window) -> None:
        assert rule.check is not None
        state = self.states[rule.name]
        threshold = self.config.settings(rule.name).threshold
        outcome = None
        if window.grace_over or not rule.uses_grace:
            outcome = rule.check(window, rule.threshold if threshold is None else threshold)
        if isinstance(outcome, NoData):
            return
        if outcome is None:
            if state.firing:
                state.cleared_step = window.step
            state.streak, state.firing, state.since_step = 0, False, None
            state.condition_since_step = None
            return
        state.streak += 1
        if state.streak == 1:
            state.condition_since_step = window.step
        state.message, state.evidence = outcome.message, outcome.evidence(window.step)
        state.evidence["condition_since_step"] = state.condition_since_step
        needed = self.config.consecutive_evaluations if rule.persistent else 1
        if state.streak < needed:
            return
        if not state.firing:
            state.firing, state.since_step = True, window.step
        state.last_firing_step = window.step
        if state.first_firing_step is None:
            state.first_firing_step = window.step
            state.first_condition_step = state.condition_since_step
            state.first_message, state.first_evidence = state.message, state.evidence

    def report(self) -> dict[str, Any]:
        """The compact /health body: verdict, step, rules firing with evidence."""
        return {
            "verdict": self.verdict,
            "step": self.step,
            "evaluations": self.evaluations,
            "grace_end_step": self.grace_end_step,
            "rules": [s.to_dict() for s in sorted(self.firing, key=_report_order)],
        }


def _report_order(state: RuleState) -> tuple[int, int, int]:
    """Most severe first, then the earliest, then the catalog's order (the primary reason)."""
    return (-_RANK[state.severity], state.since_step or 0, c.RULE_NAMES.index(state.name))


def _where(line: int | None) -> str:
    return f"line {line}: " if line is not None else ""
