"""Replay a whole trace: first firing step per rule, its evidence, the verdict over time."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lora_operator.api import constants as c
from lora_operator.health.config import HealthConfig
from lora_operator.health.engine import HealthEngine, RuleState, Transition, worse
from lora_operator.health.records import Record


@dataclass(frozen=True)
class RuleEntry:
    """A rule that fired at least once during the replay."""

    rule: str
    severity: str
    first_condition_step: int | None
    first_firing_step: int
    firing_at_end: bool
    message: str
    evidence: Mapping[str, Any]

    @classmethod
    def of(cls, state: RuleState) -> RuleEntry:
        assert state.first_firing_step is not None
        return cls(
            state.name,
            state.severity,
            state.first_condition_step,
            state.first_firing_step,
            state.firing,
            state.first_message,
            state.first_evidence,
        )


@dataclass(frozen=True)
class Timeline:
    """The outcome of a replay."""

    verdict: str
    worst_verdict: str
    last_step: int
    evaluations: int
    grace_end_step: int | None
    rules: tuple[RuleEntry, ...]
    transitions: tuple[Transition, ...]
    warnings: tuple[str, ...]

    @property
    def exit_code(self) -> int:
        """0 healthy (or unknown), 10 warning, 20 degraded or critical (the worst verdict)."""
        if worse(self.worst_verdict, c.VERDICT_DEGRADED) == self.worst_verdict:
            return c.EXIT_VERDICT_DEGRADED
        if self.worst_verdict == c.VERDICT_WARNING:
            return c.EXIT_VERDICT_WARNING
        return c.EXIT_VERDICT_HEALTHY

    def first_firing(self, rule: str) -> int | None:
        return next((e.first_firing_step for e in self.rules if e.rule == rule), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "worst_verdict": self.worst_verdict,
            "last_step": self.last_step,
            "evaluations": self.evaluations,
            "grace_end_step": self.grace_end_step,
            "rules": [
                {
                    "rule": e.rule,
                    "severity": e.severity,
                    "first_condition_step": e.first_condition_step,
                    "first_firing_step": e.first_firing_step,
                    "firing_at_end": e.firing_at_end,
                    "message": e.message,
                    "evidence": dict(e.evidence),
                }
                for e in self.rules
            ],
            "transitions": [
                {"step": t.step, "verdict": t.verdict, "rules": list(t.rules)}
                for t in self.transitions
            ],
            "warnings": list(self.warnings),
        }


def replay(
    records: Iterable[Record | Mapping[str, Any]],
    config: HealthConfig | None = None,
    data_stats: Mapping[str, Any] | None = None,
) -> Timeline:
    """Feed every record to a fresh engine, in order."""
    engine = HealthEngine(config)
    if data_stats is not None:
        engine.observe_data_stats(data_stats)
    for record in records:
        engine.observe(record)
    return timeline_of(engine)


def timeline_of(engine: HealthEngine) -> Timeline:
    fired = [s for s in engine.states.values() if s.first_firing_step is not None]
    fired.sort(key=lambda s: (s.first_firing_step, c.RULE_NAMES.index(s.name)))
    return Timeline(
        verdict=engine.verdict,
        worst_verdict=engine.worst_verdict,
        last_step=engine.step,
        evaluations=engine.evaluations,
        grace_end_step=engine.grace_end_step,
        rules=tuple(RuleEntry.of(s) for s in fired),
        transitions=tuple(engine.transitions),
        warnings=tuple(engine.warnings),
    )
