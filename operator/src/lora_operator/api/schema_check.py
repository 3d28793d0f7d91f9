"""Check an object against a structural CRD schema as the API server would on write.

Order as in kube-apiserver: apply defaults, reject unknown fields (kubectl's default strict
field validation), validate the OpenAPI schema, then evaluate the CEL rules of every node.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Any

import jsonschema
from pydantic.alias_generators import to_camel

from lora_operator.api.cel import check_node

Schema = dict[str, Any]


@dataclass(frozen=True, order=True)
class Problem:
    """One reason an object is invalid: the field path and what to do."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.message}"


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def apply_defaults(value: Any, schema: Schema) -> Any:
    """A copy of value with schema defaults filled in (recursively, as the API server does)."""
    value = copy.deepcopy(value)
    _default_in_place(value, schema)
    return value


def _default_in_place(value: Any, schema: Schema) -> None:
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        for key, item in value.items():
            sub = props.get(key)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                _default_in_place(item, sub)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _default_in_place(item, schema["items"])


def unknown_fields(value: Any, schema: Schema, path: str = "") -> list[Problem]:
    """Fields the schema does not declare (the API server would prune or reject them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    problems: list[Problem] = []
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        for key, item in value.items():
            if key in props:
                problems += unknown_fields(item, props[key], _join(path, key))
                continue
            close = _suggest(str(key), list(props))
            hint = f"; did you mean {close}?" if close else f"; known: {', '.join(props)}"
            problems.append(Problem(_join(path, key), f"unknown field{hint}"))
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            problems += unknown_fields(item, schema["additionalProperties"], _join(path, key))
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problems += unknown_fields(item, schema["items"], _join(path, i))
    return problems


# Names users bring from peft / transformers configs.
_SYNONYMS = {
    "rank": "r",
    "loraAlpha": "alpha",
    "loraDropout": "dropout",
    "lr": "learningRate",
    "numTrainEpochs": "epochs",
    "perDeviceTrainBatchSize": "microBatchSize",
    "warmupRatio": "warmup",
    "warmupSteps": "warmup",
    "lrSchedulerType": "scheduler",
}


def _suggest(key: str, known: list[str]) -> str | None:
    camel = to_camel(key)
    for candidate in (camel, _SYNONYMS.get(camel)):
        if candidate in known:
            return candidate
    close = difflib.get_close_matches(key, known, n=1)
    return close[0] if close else None


def schema_errors(value: Any, schema: Schema) -> list[Problem]:
    """OpenAPI v3.0 schema violations (types, enums, ranges, patterns, required)."""
    validator = jsonschema.Draft4Validator(schema)
    problems = []
    for err in validator.iter_errors(value):
        path = ""
        for key in err.absolute_path:
            path = _join(path, key)
        if err.validator == "required":
            missing = err.message.split("'")[1] if "'" in err.message else ""
            path, message = _join(path, missing), "required field is missing"
        else:
            message = _schema_message(err)
        problems.append(Problem(path, message))
    return problems


def _schema_message(err: jsonschema.ValidationError) -> str:
    bound: Any = err.validator_value
    if err.validator == "enum":
        return f"must be one of {', '.join(str(v) for v in bound)} (got {err.instance!r})"
    if err.validator == "type":
        return f"must be of type {bound} (got {err.instance!r})"
    if err.validator == "pattern":
        return f"must match {bound} (got {err.instance!r})"
    names = {
        "minimum": "at least",
        "maximum": "at most",
        "minLength": "at least this many characters:",
        "maxLength": "at most this many characters:",
        "minItems": "at least this many items:",
        "maxItems": "at most this many items:",
    }
    if err.validator in names:
        return f"must be {names[str(err.validator)]} {bound} (got {_short(err.instance)})"
    return err.message


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def cel_errors(value: Any, schema: Schema, path: str = "") -> list[Problem]:
    """Violations of the CEL rules of every node, deepest first as the server reports."""
    problems: list[Problem] = []
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                problems += cel_errors(value[key], sub, _join(path, key))
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problems += cel_errors(item, schema["items"], _join(path, i))
    for violation in check_node(schema, value):
        field = (path + violation.field_path).lstrip(".")
        problems.append(Problem(field, violation.message))
    return problems


def check_object(value: Any, schema: Schema) -> tuple[Any, list[Problem]]:
    """Default, then validate; returns the defaulted object and its problems (sorted)."""
    defaulted = apply_defaults(value, schema)
    problems = unknown_fields(defaulted, schema) + schema_errors(defaulted, schema)
    if not problems:
        problems = cel_errors(defaulted, schema)
    return defaulted, sorted(set(problems))
