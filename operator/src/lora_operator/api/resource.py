"""The LoRAFineTune resource as a whole (apiVersion, kind, metadata, spec, status)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lora_operator.api.base import ApiModel
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.api.status import LoRAFineTuneStatus

# Child objects get names derived from this one (Job pods: NAME-INDEX, Service NAME-workers);
# 52 characters leaves room for those suffixes inside the 63-character DNS label limit.
MAX_NAME_LENGTH = 52
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


class ObjectMeta(BaseModel):
    """The parts of metav1.ObjectMeta the operator reads; the rest is kept as is."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class LoRAFineTune(ApiModel):
    """A LoRAFineTune object."""

    api_version: Literal["lora-operator.dev/v1alpha1"] = Field(default="lora-operator.dev/v1alpha1")
    kind: Literal["LoRAFineTune"] = Field(default="LoRAFineTune")
    metadata: ObjectMeta
    spec: LoRAFineTuneSpec
    status: LoRAFineTuneStatus | None = None

    def to_wire(self) -> dict[str, Any]:
        body = super().to_wire()
        body["metadata"] = self.metadata.model_dump(exclude_unset=True, mode="json")
        return body
