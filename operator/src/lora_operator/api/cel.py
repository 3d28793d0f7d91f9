"""CEL rules (`x-kubernetes-validations`) evaluated the way the API server does.

Values are converted by their schema type, as Kubernetes does: a `number` field holding 32
is the double 32.0 in CEL, so `self.alpha > 0.0` works for `alpha: 32`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import celpy
from celpy import celtypes
from celpy.evaluation import CELEvalError

Schema = dict[str, Any]


@dataclass(frozen=True)
class RuleViolation:
    """A CEL rule that evaluated to false (or failed to evaluate) on one schema node."""

    field_path: str  # relative to the node, e.g. ".r", or "" for the node itself
    message: str


@lru_cache(maxsize=512)
def _program(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def to_cel(value: Any, schema: Schema) -> Any:
    """A JSON value as a CEL value typed by its schema node."""
    kind = schema.get("type")
    if value is None:
        return None
    if kind == "object" or isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = celtypes.MapType()
        for key, item in value.items():
            sub = props.get(key) or (extra if isinstance(extra, dict) else {})
            out[celtypes.StringType(key)] = to_cel(item, sub)
        return out
    if kind == "array" or isinstance(value, list):
        return celtypes.ListType([to_cel(v, schema.get("items", {})) for v in value])
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if kind == "number":
        return celtypes.DoubleType(float(value))
    if isinstance(value, int):
        return celtypes.IntType(value)
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    return celtypes.StringType(str(value))


def check_node(schema: Schema, value: Any) -> list[RuleViolation]:
    """Evaluate the CEL rules attached to one schema node against its value."""
    rules = schema.get("x-kubernetes-validations", [])
    if not rules or value is None:
        return []
    activation = {"self": to_cel(value, schema)}
    violations = []
    for rule in rules:
        try:
            ok = bool(_program(rule["rule"]).evaluate(activation))
        except CELEvalError as err:
            ok, rule = False, {**rule, "message": f"{rule['message']} ({err.args[0]})"}
        if not ok:
            violations.append(RuleViolation(rule.get("fieldPath", ""), rule["message"]))
    return violations
