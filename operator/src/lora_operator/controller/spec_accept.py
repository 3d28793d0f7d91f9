"""Which spec a reconcile builds from (pure): validation (memoized; CEL included), the spec
that started (the ConfigMap), and the training fields that may not change after start."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from lora_operator.api import constants as c
from lora_operator.api.schema_check import Problem
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.builders.names import SPEC_FILE
from lora_operator.controller.settings import OperatorConfig
from lora_operator.controller.spec_checks import semantic_problems
from lora_operator.controller.state import Observed, StatusDraft
from lora_operator.validation import DocumentResult, validate_body

LIVE_FIELDS = ("runPolicy",)  # may change while running; everything else is fixed at start
VALIDATION_CACHE = 4096  # distinct specs kept validated (a few KiB each)


def accepted_spec(
    body: dict[str, Any], observed: Observed, config: OperatorConfig, st: StatusDraft
) -> LoRAFineTuneSpec | None:
    """The spec to build from, with SpecAccepted set; None when nothing may be built."""
    meta = body["metadata"]
    started = started_spec(observed.configmap)
    envelope = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {"name": meta["name"], "namespace": meta.get("namespace")},
        "spec": body.get("spec"),
    }
    result = _validated(json.dumps(envelope, sort_keys=True))
    problems = result.problems
    if result.resource is not None:
        problems = semantic_problems(result.resource.spec, config)
    if problems or result.resource is None:
        st.set(c.COND_SPEC_ACCEPTED, False, c.REASON_INVALID_SPEC, _describe(problems), warn=True)
        return started  # a running job keeps the spec it started with
    spec = result.resource.spec
    if started is None:
        st.set(c.COND_SPEC_ACCEPTED, True, c.REASON_SPEC_VALID, "spec accepted")
        return spec
    changed = immutable_changes(started, spec)
    if changed:
        message = (
            f"{', '.join(changed)} cannot change after the job started; revert "
            f"{'it' if len(changed) == 1 else 'them'} or create a new LoRAFineTune "
            f"(only {', '.join('spec.' + f for f in LIVE_FIELDS)} may change)"
        )
        st.set(c.COND_SPEC_ACCEPTED, False, c.REASON_IMMUTABLE_FIELD, message, warn=True)
    else:
        st.set(c.COND_SPEC_ACCEPTED, True, c.REASON_SPEC_VALID, "spec accepted")
    return started.model_copy(update={"run_policy": spec.run_policy})


@functools.lru_cache(maxsize=VALIDATION_CACHE)
def _validated(envelope: str) -> DocumentResult:
    """validate_body of a JSON text, memoized: a spec is validated (CEL included) once, not
    on every health tick of every job. Results are never mutated."""
    return validate_body(json.loads(envelope), "spec")


def started_spec(configmap: dict[str, Any] | None) -> LoRAFineTuneSpec | None:
    """The spec the job started with (from its ConfigMap), if it started."""
    if configmap is None:
        return None
    text = (configmap.get("data") or {}).get(SPEC_FILE)
    return _started_from(text) if isinstance(text, str) else None


@functools.lru_cache(maxsize=VALIDATION_CACHE)
def _started_from(text: str) -> LoRAFineTuneSpec | None:
    try:
        return LoRAFineTuneSpec.model_validate(json.loads(text)["spec"])
    except (KeyError, TypeError, ValueError, ValidationError):
        return None


def immutable_changes(started: LoRAFineTuneSpec, current: LoRAFineTuneSpec) -> list[str]:
    """Field paths (spec.a.b) that differ, outside the live fields."""
    before, after = started.to_wire(), current.to_wire()
    for key in LIVE_FIELDS:
        before.pop(key, None)
        after.pop(key, None)
    return _diff(before, after, "spec")


def _diff(before: Any, after: Any, path: str) -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        return [
            p
            for key in sorted(set(before) | set(after))
            for p in _diff(before.get(key), after.get(key), f"{path}.{key}")
        ]
    return [] if before == after else [path]


def _describe(problems: Sequence[Problem]) -> str:
    return "; ".join(str(p) for p in problems) or "the spec is invalid"
