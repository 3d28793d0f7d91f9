"""status of a LoRAFineTune: phase, conditions, progress, metrics, health."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from lora_operator.api import constants as c
from lora_operator.api.base import ApiModel

PhaseName = Literal["Pending", "Starting", "Running", "Succeeded", "Failed", "Suspended"]
VerdictName = Literal["Healthy", "Warning", "Degraded", "Critical", "Unknown"]
SeverityName = Literal["Warning", "Degraded", "Critical"]


class Condition(ApiModel):
    """A metav1.Condition."""

    type: str = Field(max_length=316, description="Condition type, e.g. Degraded.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, description="CamelCase reason (for Degraded: the rule).")
    message: str = Field(default="", max_length=32768, description="Human-readable detail.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation this condition was set for."
    )


class Progress(ApiModel):
    """Training progress."""

    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, ge=0, description="Optimizer steps planned.")
    epoch: float | None = Field(default=None, ge=0, description="Epochs done (fractional).")
    percent: float | None = Field(default=None, ge=0, le=100, description="step / totalSteps.")
    eta_seconds: float | None = Field(default=None, ge=0, description="Estimated time left.")
    last_step_time: str | None = Field(default=None, description="When step last advanced.")


class TrainingMetrics(ApiModel):
    """Latest metrics reported by the trainer."""

    loss: float | None = Field(default=None, description="Last training loss.")
    eval_loss: float | None = Field(default=None, description="Last eval loss.")
    bleu: float | None = Field(default=None, description="Last eval BLEU (0-100).")
    rouge_l: float | None = Field(default=None, description="Last eval ROUGE-L F1 (0-1).")
    tokens_per_second: float | None = Field(default=None, description="Training throughput.")


class FiringRule(ApiModel):
    """A health rule that is firing, with its evidence."""

    rule: Literal[c.RULE_NAMES] = Field(description="Rule name.")  # type: ignore[valid-type]
    severity: SeverityName = Field(description="Severity of the rule.")
    since_step: int = Field(ge=0, description="First step of the current firing streak.")
    message: str = Field(default="", max_length=4096, description="What was measured.")
    evidence: dict[str, Any] = Field(
        default_factory=dict,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        description="Measured values and the worst layers/modules.",
    )


class HealthStatus(ApiModel):
    """The latest health verdict."""

    verdict: VerdictName = Field(default="Unknown", description="Overall verdict.")
    reason: str | None = Field(
        default=None, max_length=128, description="The most severe firing rule, if any."
    )
    step: int | None = Field(default=None, ge=0, description="Step of the verdict.")
    rules_firing: list[FiringRule] = Field(
        default_factory=list, max_length=64, description="Rules firing now."
    )
    last_check_time: str | None = Field(default=None, description="When /health was last read.")
    message: str | None = Field(default=None, max_length=4096, description="Summary.")


class AdapterStatus(ApiModel):
    """Where the trained adapter is."""

    uri: str | None = Field(default=None, description="Adapter location (peft format).")
    checkpoint_uri: str | None = Field(default=None, description="Latest checkpoint.")


class LoRAFineTuneStatus(ApiModel):
    """Observed state of a LoRAFineTune."""

    phase: PhaseName | None = Field(default=None, description="Lifecycle phase.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation last reconciled."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="metav1 conditions, keyed by type.",
    )
    start_time: str | None = Field(default=None, description="When training started.")
    completion_time: str | None = Field(default=None, description="When the job finished.")
    restarts: int | None = Field(default=None, ge=0, description="Gang restarts so far.")
    restarted_job_uid: str | None = Field(
        default=None,
        max_length=128,
        description="UID of the last failed Job the operator restarted (counted once).",
    )
    progress: Progress | None = Field(default=None, description="Training progress.")
    metrics: TrainingMetrics | None = Field(default=None, description="Latest metrics.")
    health: HealthStatus | None = Field(default=None, description="Latest health verdict.")
    adapter: AdapterStatus | None = Field(default=None, description="Adapter location.")
