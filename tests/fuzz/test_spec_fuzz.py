"""Fuzzed LoRAFineTune bodies through validate_body, `lora-operator validate`, the models, the
builders and reconcile (the operator's decision, in-process).

Valid bodies must validate, build children Kubernetes accepts (kubernetes-validate strict,
1.31) and make reconcile create them; invalid ones must be rejected naming a field of the
section that was broken, and reconcile must create nothing for them. Nothing may raise.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from lora_operator.api import constants as c
from lora_operator.api.resource import LoRAFineTune
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.builders import (
    Owner,
    build_headless_service,
    build_indexed_job,
    build_preflight_job,
    build_spec_configmap,
)
from lora_operator.cli import main
from lora_operator.controller.reconcile import Observed, reconcile
from lora_operator.controller.settings import OperatorConfig
from lora_operator.validation import validate_body
from tests.fuzz.strategies import (
    UNBOUNDED_INTS,
    Mutation,
    deep,
    fuzz_settings,
    invalid_bodies,
    section,
    valid_bodies,
)

K8S = "1.31.0"
IMAGE = "ghcr.io/lora-operator/trainer:0.1.0"
NOW = "2026-01-01T00:00:00Z"
CONFIG = OperatorConfig()


def _as_created(body: dict[str, Any]) -> dict[str, Any]:
    """BODY as the operator receives it from the API server: uid, namespace, generation."""
    out = copy.deepcopy(body)
    meta = out.setdefault("metadata", {})
    meta |= {"uid": "fuzz-uid", "namespace": "ml-team", "generation": 1}
    return out


def children(spec: LoRAFineTuneSpec, name: str) -> list[dict[str, Any]]:
    owner = Owner(name, "ml-team", "fuzz-uid")
    return [
        build_spec_configmap(spec, owner),
        build_headless_service(spec, owner),
        build_indexed_job(spec, owner, IMAGE),
        build_indexed_job(spec, owner, IMAGE, queue_name="team-a"),
        build_preflight_job(spec, owner, IMAGE),
    ]


def assert_kubernetes_valid(objs: list[dict[str, Any]]) -> None:
    for obj in objs:
        json.dumps(obj, allow_nan=False)  # what goes on the wire is strict JSON
        kubernetes_validate.validate(obj, K8S, strict=True)


def assert_names_section(problems: list[Any], mutation: Mutation) -> None:
    assert problems, f"accepted: {mutation}"
    want = section(mutation.path)
    paths = [p.path for p in problems]
    assert any(section(p) == want for p in paths), f"{mutation}: problems name {paths}"


def decision_json(decision: Any) -> str:
    return json.dumps(dataclasses.asdict(decision), allow_nan=False, sort_keys=True)


def spec_accepted(decision: Any) -> dict[str, Any]:
    conds = decision.status["conditions"]
    return next(x for x in conds if x["type"] == c.COND_SPEC_ACCEPTED)


@fuzz_settings(ci=25)
@given(valid_bodies())
def test_valid_bodies_validate_build_and_reconcile(body: dict[str, Any]) -> None:
    result = validate_body(copy.deepcopy(body))
    assert result.ok, [str(p) for p in result.problems]
    assert result.resource is not None
    spec = result.resource.spec
    # the models round-trip: the wire form parses back to the same spec
    assert LoRAFineTuneSpec.model_validate(spec.to_wire()) == spec
    assert LoRAFineTune.model_validate(result.resource.to_wire()).spec == spec
    assert_kubernetes_valid(children(spec, body["metadata"]["name"]))
    decision = reconcile(_as_created(body), Observed(), CONFIG, NOW)
    decision_json(decision)
    assert spec_accepted(decision)["status"] == "True"
    assert decision.create, "a valid new job gets children"
    assert_kubernetes_valid(decision.create)


@fuzz_settings()
@given(invalid_bodies())
def test_invalid_bodies_are_rejected_naming_the_field(
    case: tuple[dict[str, Any], Mutation],
) -> None:
    body, mutation = case
    result = validate_body(copy.deepcopy(body))
    assert result.resource is None
    assert_names_section(result.problems, mutation)
    decision = reconcile(_as_created(body), Observed(), CONFIG, NOW)
    decision_json(decision)
    assert decision.create == [], f"children created for {mutation}"
    cond = spec_accepted(decision)
    assert cond["status"] == "False" and cond["reason"] == c.REASON_INVALID_SPEC
    assert section(mutation.path) in cond["message"], (mutation, cond["message"])


@given(st.one_of(st.none(), st.integers(), st.text(max_size=20), st.lists(st.integers())))
@fuzz_settings(ci=20)
def test_non_mapping_documents_are_rejected(doc: Any) -> None:
    result = validate_body(doc)
    assert not result.ok and result.resource is None


@fuzz_settings(ci=15, full=300)
@given(st.lists(st.one_of(valid_bodies(), invalid_bodies().map(lambda c: c[0])), min_size=1,
                max_size=3))  # fmt: skip
def test_validate_cli_exit_codes_and_json(tmp_path: Path, bodies: list[dict[str, Any]]) -> None:
    path = tmp_path / "docs.yaml"
    path.write_text(yaml.safe_dump_all(bodies, allow_unicode=True))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", str(path), "-o", "json"])
    report = json.loads(out.getvalue())
    assert len(report) == len(bodies)
    want = [validate_body(copy.deepcopy(b)).ok for b in bodies]
    assert [r["valid"] for r in report] == want
    assert code == (c.EXIT_OK if all(want) else c.EXIT_ERROR)
    for doc in report:
        assert doc["valid"] == (not doc["problems"])
        assert all(p["field"] for p in doc["problems"]), doc


@fuzz_settings(ci=10, full=200)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_validate_cli_never_tracebacks_on_garbage_files(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "garbage.yaml"
    path.write_bytes(data)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["validate", str(path), "-o", "json"])
    assert code in (c.EXIT_OK, c.EXIT_ERROR)


# --- found by fuzzing: see the reasons ------------------------------------------------------

_OVERFLOW = (
    "BUG: an integer >= 2**63 in a field without a maximum (e.g. "
    "spec.training.checkpointEverySteps) raises ValueError('overflow') from celpy "
    "(api/cel.py to_cel -> celtypes.IntType) through schema_check.cel_errors, "
    "validation.validate_body and reconcile, instead of a problem naming the field"
)


@fuzz_settings(ci=5, full=50)
@given(valid_bodies(), st.sampled_from(UNBOUNDED_INTS), st.integers(2**63, 10**40))
def test_int64_overflow_is_a_problem_not_a_crash(
    body: dict[str, Any], path: str, value: int
) -> None:
    from tests.fuzz.strategies import _set

    _set(body, path, value)
    if path == "spec.training.warmup.steps":
        body["spec"]["training"]["warmup"].pop("ratio", None)
    result = validate_body(body)
    assert_names_section(result.problems, Mutation(path, "range", value))


_DEEP = (
    "BUG: a body nested ~1500 levels deep (e.g. under spec.pod.affinity, which preserves "
    "unknown fields, or any unknown key) raises RecursionError from validation.validate_body "
    "(schema_check.apply_defaults copy.deepcopy); `lora-operator validate` on a YAML file "
    "nested ~1200 levels raises RecursionError from yaml.safe_load_all in "
    "validation.validate_file (only YAMLError is caught): a traceback, exit 1"
)


@pytest.mark.parametrize("where", ["spec.pod.affinity", "spec.bogus"])
def test_deeply_nested_body_is_rejected_not_a_crash(
    quickstart_body: dict[str, Any], where: str
) -> None:
    from tests.fuzz.strategies import _set

    body = copy.deepcopy(quickstart_body)
    _set(body, where, {"a": deep(3000)})
    result = validate_body(body)
    assert not result.ok


def test_validate_cli_deeply_nested_yaml_is_rejected_not_a_crash(tmp_path: Path) -> None:
    n = 1500
    path = tmp_path / "deep.yaml"
    path.write_text(
        "apiVersion: lora-operator.dev/v1alpha1\nkind: LoRAFineTune\nmetadata: {name: a}\n"
        "spec: {x: " + "{a: " * n + "1" + "}" * n + "}\n"
    )
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["validate", str(path)])
    assert code == c.EXIT_ERROR and "nested too deeply" in err.getvalue()
