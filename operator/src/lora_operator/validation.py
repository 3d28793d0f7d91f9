"""Validate LoRAFineTune manifests offline: CRD schema, CEL rules, then the models.

The same checks the API server makes on `kubectl apply` (defaults, unknown fields, schema,
CEL, and its decoder's limits), followed by the operator's own parse. `lora-operator validate`
adds the operator's semantic checks (controller.spec_checks), so a spec that passes there is
one the operator accepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lora_operator.api import constants as c
from lora_operator.api.crd import resource_schema
from lora_operator.api.resource import LoRAFineTune
from lora_operator.api.schema_check import Problem, check_object
from lora_operator.health.config import HealthConfig


class SpecFileError(Exception):
    """A manifest file that gives no usable spec (the message names the file)."""


@dataclass
class DocumentResult:
    """The outcome for one YAML document."""

    source: str
    name: str
    problems: list[Problem] = field(default_factory=list)
    resource: LoRAFineTune | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_body(body: Any, source: str = "<input>") -> DocumentResult:
    """Check one LoRAFineTune body; every problem names its field path and the fix."""
    if not isinstance(body, dict):
        return DocumentResult(source, "?", [Problem("", "a manifest must be a YAML mapping")])
    name = str((body.get("metadata") or {}).get("name", "?"))
    problems = _envelope_problems(body) or _value_limits(body)
    if problems:
        return DocumentResult(source, name, problems)
    defaulted, problems = check_object(body, resource_schema())
    if problems:
        return DocumentResult(source, name, problems)
    try:
        resource = LoRAFineTune.model_validate(defaulted)
    except ValidationError as err:
        return DocumentResult(source, name, _pydantic_problems(err))
    return DocumentResult(source, name, [], resource)


MAX_DEPTH = 100  # nesting levels; the API server's JSON decoder refuses far less than Python's
INT64 = (-(2**63), 2**63 - 1)  # what a Kubernetes integer holds


def _value_limits(body: dict[str, Any]) -> list[Problem]:
    """What the API server's decoder refuses before any schema: nesting deeper than
    MAX_DEPTH, integers outside int64, NaN/Infinity (JSON has none). Iterative: a body
    nested thousands of levels deep cannot exhaust the stack here."""
    problems: list[Problem] = []
    stack: list[tuple[str, Any, int]] = [("", body, 0)]
    while stack and len(problems) < 10:
        path, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            problems.append(Problem(path, f"nested deeper than {MAX_DEPTH} levels: flatten it"))
            continue
        if isinstance(value, dict):
            stack.extend(
                (f"{path}.{k}" if path else str(k), v, depth + 1) for k, v in value.items()
            )
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v, depth + 1) for i, v in enumerate(value))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
            problems.append(Problem(path, "must fit in a 64-bit integer (at most 2^63-1)"))
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(Problem(path, f"must be a finite number (got {value})"))
    return sorted(problems)


def _envelope_problems(body: dict[str, Any]) -> list[Problem]:
    problems = []
    if body.get("apiVersion") != c.API_VERSION:
        problems.append(
            Problem("apiVersion", f"must be {c.API_VERSION} (got {body.get('apiVersion')!r})")
        )
    if body.get("kind") != c.KIND:
        problems.append(Problem("kind", f"must be {c.KIND} (got {body.get('kind')!r})"))
    metadata = body.get("metadata")
    if not isinstance(metadata, dict) or not metadata.get("name"):
        problems.append(Problem("metadata.name", "required: give the job a name"))
    return problems


def _pydantic_problems(err: ValidationError) -> list[Problem]:
    problems = []
    for item in err.errors():
        path = ".".join(str(p) for p in item["loc"])
        problems.append(Problem(path, item["msg"].removeprefix("Value error, ")))
    return sorted(problems)


def validate_file(path: Path) -> list[DocumentResult]:
    """Every LoRAFineTune document of a (multi-document) YAML file."""
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, UnicodeDecodeError) as err:
        return [DocumentResult(str(path), "?", [Problem("", f"cannot read file: {err}")])]
    except yaml.YAMLError as err:
        return [DocumentResult(str(path), "?", [Problem("", f"not valid YAML: {err}")])]
    except RecursionError:
        message = f"nested too deeply to read (the API accepts at most {MAX_DEPTH} levels)"
        return [DocumentResult(str(path), "?", [Problem("", message)])]
    if not documents:
        return [DocumentResult(str(path), "?", [Problem("", "no YAML document in the file")])]
    return [validate_body(doc, str(path)) for doc in documents]


def health_config_of_file(path: Path) -> HealthConfig:
    """The health rules' configuration of the first LoRAFineTune in a manifest file.

    SpecFileError when the file cannot be read, a document before it is invalid, or there is
    none (`lora-operator health replay --spec`, `lora-operator report --spec`).
    """
    try:
        results = validate_file(path)
    except OSError as err:
        raise SpecFileError(f"cannot read {path}: {err.strerror or err}") from err
    for result in results:
        if result.problems:
            problems = "; ".join(f"{p.path}: {p.message}" for p in result.problems)
            raise SpecFileError(f"{path}: invalid spec: {problems}")
        if result.resource is not None:
            spec = result.resource.spec
            return HealthConfig.from_spec(spec.health, spec.training, spec.lora)
    raise SpecFileError(f"{path}: no {c.KIND} document")
