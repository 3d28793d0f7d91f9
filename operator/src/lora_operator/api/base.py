"""The base of every API model: camelCase on the wire, unknown fields rejected."""

from __future__ import annotations

from functools import cache
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel

from lora_operator.api.cel import check_node
from lora_operator.api.openapi import Schema, model_schema


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry (a CEL rule checked by the API server)."""
    entry = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    return entry


def cel_rules(*rules: dict[str, str]) -> dict[str, Any]:
    """`json_schema_extra` carrying CEL rules for a model's schema node."""
    return {"x-kubernetes-validations": list(rules)}


class ApiModel(BaseModel):
    """camelCase aliases, validation by alias or name, unknown fields are errors."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase, unset optionals omitted."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    @model_validator(mode="after")
    def _check_cel_rules(self) -> Self:
        """The CRD's CEL rules hold for models built in Python too (one source of rules)."""
        extra = type(self).model_config.get("json_schema_extra")
        if not isinstance(extra, dict) or not extra.get("x-kubernetes-validations"):
            return self
        violations = check_node(_schema_of(type(self)), self.to_wire())
        if violations:
            raise ValueError("; ".join(f"{v.field_path or '.'}: {v.message}" for v in violations))
        return self


@cache
def _schema_of(model: type[BaseModel]) -> Schema:
    return model_schema(model)
