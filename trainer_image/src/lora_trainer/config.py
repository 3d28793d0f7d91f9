"""The trainer's inputs: the spec file, URI resolution, output layout."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lora_operator.api.resource import LoRAFineTune
from lora_operator.api.spec import LoRAFineTuneSpec

# Where pvc://CLAIM/PATH volumes are mounted in the pod (the operator mounts them here).
PVC_ROOT_ENV = "LORA_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"
# A mounted Secret key holding the hub token (the operator mounts spec.model.tokenSecretRef).
HF_TOKEN_FILE_ENV = "LORA_HF_TOKEN_FILE"


class SpecError(ValueError):
    """The spec file is missing or invalid; the message names the file and the field."""


def load_spec(path: Path) -> tuple[str, LoRAFineTuneSpec]:
    """(job name, spec) from a LoRAFineTune manifest or a bare spec mapping (YAML or JSON)."""
    try:
        body: Any = yaml.safe_load(path.read_text())
    except OSError as err:
        raise SpecError(f"cannot read spec file {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise SpecError(f"spec file {path} is not valid YAML: {err}") from err
    if not isinstance(body, dict):
        raise SpecError(f"spec file {path} must hold a mapping")
    try:
        if "spec" in body:
            resource = LoRAFineTune.model_validate(body)
            return resource.metadata.name, resource.spec
        return path.stem, LoRAFineTuneSpec.model_validate(body)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise SpecError(f"invalid spec in {path}: {problems}") from err


def resolve_uri(uri: str) -> Path:
    """A local path for a file:// or pvc:// URI (hf:// is not a path: see model.py)."""
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if uri.startswith("pvc://"):
        root = Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))
        return root / uri.removeprefix("pvc://")
    raise SpecError(f"{uri!r} is not a file:// or pvc:// URI")


@dataclass(frozen=True)
class OutputLayout:
    """Where the trainer writes, under spec.output.uri (or --output)."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def trace(self) -> Path:
        return self.root / "trace.jsonl"

    @property
    def data_stats(self) -> Path:
        return self.root / "data_stats.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"
