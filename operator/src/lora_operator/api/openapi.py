"""pydantic models -> a structural OpenAPI v3 schema, as a CustomResourceDefinition needs.

Structural means: every node has a type, no $ref, no anyOf/oneOf over types, no null type,
defaults and validations expressed the Kubernetes way (minimum + exclusiveMinimum: true,
x-kubernetes-validations, x-kubernetes-preserve-unknown-fields).
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

Schema = dict[str, Any]

# JSON-Schema keywords a CRD schema accepts and we carry over unchanged.
_KEPT = (
    "description",
    "type",
    "enum",
    "default",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "format",
    "required",
    "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-int-or-string",
)


class _DefaultsFromFactories(GenerateJsonSchema):
    """Like pydantic's generator, but default_factory defaults appear as `default`."""

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        factory = schema.get("default_factory")
        if factory is None:
            return super().default_schema(schema)
        json_schema = self.generate_inner(schema["schema"])
        if isinstance(factory, type) and issubclass(factory, BaseModel):
            json_schema["default"] = {}
        else:
            value = factory()  # type: ignore[call-arg]
            if isinstance(value, BaseModel):
                value = value.model_dump(by_alias=True, exclude_none=True, mode="json")
            json_schema["default"] = value
        return json_schema


def model_schema(model: type[BaseModel]) -> Schema:
    """The structural schema of a model, camelCase, with defaults and CEL rules."""
    raw = model.model_json_schema(by_alias=True, schema_generator=_DefaultsFromFactories)
    defs = raw.pop("$defs", {})
    return _structural(raw, defs)


def _resolve(node: Schema, defs: dict[str, Schema]) -> Schema:
    """Inline a $ref (keeping keywords set next to it) and unwrap Optional[X]."""
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        node = {**target, **node}
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"non-structural union in schema: {branches}")
        if node.get("default", 0) is None:
            node.pop("default")
        node = {**_resolve(branches[0], defs), **node}
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**_resolve(node.pop("allOf")[0], defs), **node}
    return node


def _structural(node: Schema, defs: dict[str, Schema]) -> Schema:
    node = _resolve(node, defs)
    out: Schema = {k: node[k] for k in _KEPT if k in node}
    if "const" in node:
        out["enum"] = [node["const"]]
    if "exclusiveMinimum" in node:
        out["minimum"] = node["exclusiveMinimum"]
        out["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node:
        out["maximum"] = node["exclusiveMaximum"]
        out["exclusiveMaximum"] = True
    if "enum" in out and "type" not in out:
        out["type"] = _enum_type(out["enum"])
    if "properties" in node:
        out["type"] = "object"
        out["properties"] = {k: _structural(v, defs) for k, v in node["properties"].items()}
    elif out.get("type") == "object" and not out.get("x-kubernetes-preserve-unknown-fields"):
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = _structural(extra, defs)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    if "items" in node:
        out["items"] = _structural(node["items"], defs)
    if "type" not in out:
        raise ValueError(f"schema node without a type: {node}")
    return out


def _enum_type(values: list[Any]) -> str:
    if all(isinstance(v, str) for v in values):
        return "string"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "integer"
    raise ValueError(f"mixed enum {values}")
