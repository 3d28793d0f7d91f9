"""The engine's configuration, built from spec.health (+ spec.training and spec.lora)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lora_operator.api.spec import HealthSpec, LoRASpec, TrainingSpec

# Grace ends at the latest at max(minSteps, min(warmup, GRACE_TOTAL_FRACTION x total) + 10).
GRACE_TOTAL_FRACTION = 0.2
GRACE_EXTRA_STEPS = 10


@dataclass(frozen=True)
class RuleSettings:
    """A rule as configured: switch, severity and threshold (None: the rule's default)."""

    enabled: bool = True
    severity: str | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class HealthConfig:
    """Everything the rules need; the defaults are HealthSpec's."""

    evaluation_interval_steps: int = 10
    consecutive_evaluations: int = 3
    grace_lr_sum: float = 5.0e-3
    grace_min_steps: int = 50
    warmup_steps: int | None = None
    total_steps: int | None = None
    learning_rate: float | None = None
    lora_r: int | None = None
    lora_alpha: float | None = None
    rules: dict[str, RuleSettings] = field(default_factory=dict)

    @property
    def grace_step_cap(self) -> int:
        """The step at which grace ends whatever the summed learning rate."""
        warmup = self.warmup_steps or 0
        if self.total_steps is not None:
            warmup = min(warmup, math.floor(GRACE_TOTAL_FRACTION * self.total_steps))
        return max(self.grace_min_steps, warmup + GRACE_EXTRA_STEPS)

    def settings(self, rule: str) -> RuleSettings:
        return self.rules.get(rule, RuleSettings())

    @classmethod
    def from_spec(
        cls,
        health: HealthSpec | None = None,
        training: TrainingSpec | None = None,
        lora: LoRASpec | None = None,
        total_steps: int | None = None,
    ) -> HealthConfig:
        """From the job's spec; total_steps overrides training.maxSteps (e.g. for epochs)."""
        health = health or HealthSpec()
        total = total_steps
        if total is None and training is not None:
            total = training.max_steps
        return cls(
            evaluation_interval_steps=health.evaluation_interval_steps,
            consecutive_evaluations=health.consecutive_evaluations,
            grace_lr_sum=health.grace.lr_sum,
            grace_min_steps=health.grace.min_steps,
            warmup_steps=warmup_steps(training, total) if training else None,
            total_steps=total,
            learning_rate=training.learning_rate if training else None,
            lora_r=lora.r if lora else None,
            lora_alpha=lora.alpha if lora else None,
            rules={o.name: RuleSettings(o.enabled, o.severity, o.threshold) for o in health.rules},
        )


def warmup_steps(training: TrainingSpec, total_steps: int | None) -> int | None:
    """Warmup in steps (the trainer rounds a ratio up); None when a ratio has no total."""
    if training.warmup.steps is not None:
        return training.warmup.steps
    ratio = training.warmup.ratio or 0.0
    if total_steps is None:
        return None if ratio else 0
    return math.ceil(ratio * total_steps)
