"""Validate LoRAFineTune manifests offline: CRD schema, CEL rules, then the models.

The same checks the API server makes on `kubectl apply` (defaults, unknown fields, schema,
CEL), followed by the operator's own parse, so a spec that passes here is one the operator
accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lora_operator.api import constants as c
from lora_operator.api.crd import resource_schema
from lora_operator.api.resource import LoRAFineTune
from lora_operator.api.schema_check import Problem, check_object


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
    problems = _envelope_problems(body)
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
    if not documents:
        return [DocumentResult(str(path), "?", [Problem("", "no YAML document in the file")])]
    return [validate_body(doc, str(path)) for doc in documents]
