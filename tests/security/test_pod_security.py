"""Generated pods pass the restricted Pod Security Standard; credentials stay in Secrets.

GPU exception: none. GPUs come through resources (requests/limits of
spec.resources.gpuResourceName, e.g. nvidia.com/gpu) and the device plugin; the pods are never
privileged, mount no hostPath and add no capability, on cuda exactly as on cpu.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from lora_operator.api.resource import LoRAFineTune
from lora_operator.builders import (
    Owner,
    build_indexed_job,
    build_preflight_job,
)
from lora_operator.builders.pod import HF_TOKEN_MOUNT
from lora_operator.validation import validate_body, validate_file
from tests.conftest import EXAMPLES, deep_merge
from tests.operator.test_builders import _restricted_violations

IMAGE = "registry.example/trainer:1"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def _resources(path: Any) -> list[LoRAFineTune]:
    results = validate_file(path)
    resources = [r.resource for r in results if r.resource is not None]
    assert resources and len(resources) == len(results), [r.problems for r in results]
    return resources


def _templates(resource: LoRAFineTune) -> dict[str, dict[str, Any]]:
    owner = Owner(resource.metadata.name, "ml-team", "uid-1")
    return {
        "training": build_indexed_job(resource.spec, owner, IMAGE)["spec"]["template"],
        "preflight": build_preflight_job(resource.spec, owner, IMAGE)["spec"]["template"],
    }


def test_every_example_is_checked() -> None:
    names = {p.stem for p in EXAMPLE_FILES}
    assert {"quickstart", "collapse-demo", "llama2-7b-8gpu", "llama2-7b-2node"} <= names
    devices = {r.spec.distributed.device for p in EXAMPLE_FILES for r in _resources(p)}
    assert devices == {"cpu", "cuda"}  # the GPU examples are among them


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_every_example_pod_passes_the_restricted_profile(path: Any) -> None:
    for resource in _resources(path):
        for role, pod in _templates(resource).items():
            assert _restricted_violations(pod) == [], (path.stem, role)
            spec = pod["spec"]
            assert spec.get("automountServiceAccountToken") is False, (path.stem, role)
            for ctr in spec["containers"] + (spec.get("initContainers") or []):
                sc = ctr.get("securityContext") or {}
                assert not sc.get("privileged") and not (sc.get("capabilities") or {}).get("add")


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_gpus_come_through_resources_never_privilege(path: Any) -> None:
    """The documented GPU exception is that there is none."""
    for resource in _resources(path):
        spec = resource.spec
        for role, pod in _templates(resource).items():
            (ctr,) = pod["spec"]["containers"]
            limits = ctr["resources"]["limits"]
            gpu = spec.resources.gpu_resource_name
            if spec.distributed.device == "cuda":
                want = "1" if role == "preflight" else str(spec.distributed.gpus_per_node)
                assert limits.get(gpu) == want, (path.stem, role, limits)
            else:
                assert gpu not in limits
            text = json.dumps(pod)
            assert "hostPath" not in text and "/dev/nvidia" not in text, (path.stem, role)


def test_hf_token_is_a_mounted_secret_file_never_an_env_value(
    make_body: Any,
) -> None:
    token_ref = {"name": "hf-token", "key": "token"}
    body = make_body({"spec": {"model": {"source": "hf://org/gated-model",
                                         "tokenSecretRef": token_ref}}})  # fmt: skip
    result = validate_body(body)
    assert result.resource is not None, result.problems
    for role, pod in _templates(result.resource).items():
        assert _restricted_violations(pod) == [], role  # a secret volume is allowed
        vols = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert vols["hf-token"]["secret"] == {
            "secretName": "hf-token", "items": [{"key": "token", "path": "token"}]}  # fmt: skip
        (ctr,) = pod["spec"]["containers"]
        mount = next(m for m in ctr["volumeMounts"] if m["name"] == "hf-token")
        assert mount == {"name": "hf-token", "mountPath": HF_TOKEN_MOUNT, "readOnly": True}
        env = {v["name"]: v for v in ctr["env"]}
        assert env["LORA_HF_TOKEN_FILE"] == {
            "name": "LORA_HF_TOKEN_FILE", "value": f"{HF_TOKEN_MOUNT}/token"}  # fmt: skip
        refs = [v for v in ctr["env"] if "secretKeyRef" in json.dumps(v)]
        assert refs == [], (role, refs)  # the token is never an env value
        assert not ctr.get("envFrom"), role


def test_token_secret_ref_is_refused_for_local_models(make_body: Any) -> None:
    """Only hf:// models take a token: a file:// model with one is an invalid spec."""
    body = make_body({"spec": {"model": {"tokenSecretRef": {"name": "t", "key": "k"}}}})
    result = validate_body(body)
    assert result.resource is None
    assert any("tokenSecretRef" in str(p) for p in result.problems), result.problems


def test_spec_env_values_cannot_smuggle_a_secret_ref_and_a_value(make_body: Any) -> None:
    env = [{"name": "X", "value": "v", "secretKeyRef": {"name": "s", "key": "k"}}]
    body = deep_merge(make_body({}), {"spec": {"pod": {"env": env}}})
    assert validate_body(body).resource is None
