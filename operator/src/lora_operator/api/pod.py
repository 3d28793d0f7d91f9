"""Pod-level overrides of a LoRAFineTune (scheduling, identity, env, volumes)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from pydantic.config import JsonDict

from lora_operator.api.base import ApiModel, cel, cel_rules

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]*$"
PRESERVE: JsonDict = {"x-kubernetes-preserve-unknown-fields": True}


class SecretKeyRef(ApiModel):
    """A key of a Secret in the job's namespace (credentials are never inlined)."""

    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="Secret name.")
    key: str = Field(
        pattern=r"^[-._a-zA-Z0-9]+$", max_length=253, description="Key within the Secret."
    )


class EnvVar(ApiModel):
    """An environment variable: a plain value, or a reference to a Secret key."""

    model_config = {
        **ApiModel.model_config,
        "json_schema_extra": cel_rules(
            cel(
                "has(self.value) != has(self.secretKeyRef)",
                "set exactly one of value and secretKeyRef (put credentials in a Secret)",
            )
        ),
    }

    name: str = Field(pattern=ENV_NAME, max_length=256, description="Variable name.")
    value: str | None = Field(
        default=None, max_length=4096, description="Plain value (never a credential)."
    )
    secret_key_ref: SecretKeyRef | None = Field(default=None, description="Value from a Secret.")


class Toleration(ApiModel):
    """A core/v1 Toleration."""

    key: str | None = Field(default=None, max_length=316, description="Taint key.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Operator.")
    value: str | None = Field(default=None, max_length=63, description="Taint value.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect."
    )
    toleration_seconds: int | None = Field(default=None, description="For NoExecute taints.")


class PodSpecOverrides(ApiModel):
    """Scheduling and identity of the training pods."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="Taints the pods tolerate."
    )
    affinity: dict[str, Any] | None = Field(
        default=None, json_schema_extra=PRESERVE, description="A core/v1 Affinity, passed through."
    )
    priority_class_name: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253, description="PriorityClass."
    )
    scheduler_name: str | None = Field(
        default=None, max_length=253, description="Scheduler (e.g. volcano, a gang scheduler)."
    )
    service_account_name: str | None = Field(
        default=None,
        pattern=DNS_SUBDOMAIN,
        max_length=253,
        description="ServiceAccount of the pods (e.g. for workload identity to a bucket).",
    )
    env: list[EnvVar] = Field(
        default_factory=list, max_length=256, description="Extra environment variables."
    )
    volumes: list[dict[str, Any]] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"items": {"type": "object", **PRESERVE}},
        description="Extra core/v1 Volumes, passed through.",
    )
    volume_mounts: list[dict[str, Any]] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"items": {"type": "object", **PRESERVE}},
        description="Extra core/v1 VolumeMounts of the trainer container.",
    )
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels.")
