"""Pure builders: the manifests a LoRAFineTune becomes, checked as Kubernetes would."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from lora_operator.api import constants as c
from lora_operator.api.resource import LoRAFineTune
from lora_operator.builders import (
    ChildNames,
    Owner,
    build_headless_service,
    build_indexed_job,
    build_preflight_job,
    build_spec_configmap,
)
from lora_operator.validation import validate_body, validate_file
from tests.conftest import EXAMPLES

IMAGE = "ghcr.io/lora-operator/trainer:0.1.0"
EXAMPLE_NAMES = ["quickstart", "collapse-demo", "llama2-7b-8gpu", "llama2-7b-2node"]


def _load(name: str) -> tuple[LoRAFineTune, Owner]:
    resource = validate_file(EXAMPLES / f"{name}.yaml")[0].resource
    assert resource is not None
    return resource, Owner(resource.metadata.name, "ml-team", "0b5e-uid")


def _children(name: str) -> list[dict[str, Any]]:
    resource, owner = _load(name)
    spec = resource.spec
    return [
        build_spec_configmap(spec, owner),
        build_headless_service(spec, owner),
        build_indexed_job(spec, owner, IMAGE),
        build_preflight_job(spec, owner, IMAGE),
    ]


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_children_are_valid_kubernetes_objects(name: str) -> None:
    for obj in _children(name):
        for version in ("1.31.0", "1.35.0"):
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_builders_are_deterministic_and_owned(name: str) -> None:
    first, second = _children(name), _children(name)
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    for obj in first:
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["kind"] == c.KIND and ref["uid"] == "0b5e-uid" and ref["controller"]
        assert obj["metadata"]["namespace"] == "ml-team"


# Pod Security Standards, "restricted" profile (kubernetes.io/docs/concepts/security/
# pod-security-standards): the checks that apply to what our builders can emit.
ALLOWED_VOLUMES = {
    "configMap",
    "emptyDir",
    "secret",
    "persistentVolumeClaim",
    "projected",
    "downwardAPI",
    "csi",
    "ephemeral",
}


def _restricted_violations(pod: dict[str, Any]) -> list[str]:
    spec, bad = pod["spec"], []
    psc = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            bad.append(key)
    for vol in spec.get("volumes", []):
        if not set(vol) - {"name"} <= ALLOWED_VOLUMES:
            bad.append(f"volume {vol['name']}")
    for ctr in spec["containers"]:
        sc = ctr.get("securityContext", {})
        if sc.get("privileged"):
            bad.append("privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append("allowPrivilegeEscalation")
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            bad.append("runAsNonRoot")
        if 0 in (sc.get("runAsUser"), psc.get("runAsUser")):
            bad.append("runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append("seccompProfile")
        caps = sc.get("capabilities", {})
        if caps.get("drop") != ["ALL"] or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append("capabilities")
        if any(p.get("hostPort") for p in ctr.get("ports", [])):
            bad.append("hostPort")
    return bad


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_pods_pass_the_restricted_pod_security_standard(name: str) -> None:
    resource, owner = _load(name)
    for job in (
        build_indexed_job(resource.spec, owner, IMAGE),
        build_preflight_job(resource.spec, owner, IMAGE),
    ):
        assert _restricted_violations(job["spec"]["template"]) == []


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_preflight_is_one_pod_on_one_device_reporting_through_its_termination_log(
    name: str,
) -> None:
    resource, owner = _load(name)
    job = build_preflight_job(resource.spec, owner, IMAGE)
    assert job["metadata"]["name"] == ChildNames(owner.name).preflight
    assert job["metadata"]["labels"][c.LABEL_ROLE] == "preflight"
    spec = job["spec"]
    assert (spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (1, 1, 0)
    assert spec["suspend"] is False and "podFailurePolicy" not in spec
    pod = spec["template"]
    assert pod["metadata"]["labels"][c.LABEL_ROLE] == "preflight"
    (container,) = pod["spec"]["containers"]
    assert "--preflight" in container["command"]
    path = container["command"][container["command"].index("--termination-log") + 1]
    assert container["terminationMessagePath"] == path
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert "ports" not in container  # never mistaken for the rank-0 trainer
    gpu = resource.spec.resources.gpu_resource_name
    if resource.spec.distributed.device == "cuda":
        assert container["resources"]["limits"][gpu] == "1"


def test_restricted_checker_catches_violations() -> None:
    resource, owner = _load("quickstart")
    pod = build_indexed_job(resource.spec, owner, IMAGE)["spec"]["template"]
    pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    pod["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}})
    assert _restricted_violations(pod) == ["volume h", "allowPrivilegeEscalation"]


def test_two_node_job_is_one_indexed_gang_with_rendezvous_at_pod_zero() -> None:
    resource, owner = _load("llama2-7b-2node")
    job = build_indexed_job(resource.spec, owner, IMAGE)
    svc = build_headless_service(resource.spec, owner)
    js = job["spec"]
    assert (js["completionMode"], js["completions"], js["parallelism"]) == ("Indexed", 2, 2)
    assert js["backoffLimit"] == 0  # the operator restarts the whole gang, never half
    rule = js["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [86]
    pod = js["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"] == "llama2-7b-2node-workers"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["LORA_MASTER_ADDR"] == "llama2-7b-2node-0.llama2-7b-2node-workers"
    assert (env["LORA_NNODES"], env["LORA_NPROC_PER_NODE"]) == ("2", "8")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    labels = js["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8"
    dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}


def test_credentials_are_only_secret_references() -> None:
    resource, owner = _load("llama2-7b-2node")
    spec = resource.spec.model_copy(deep=True)
    spec.pod.env = [
        type(spec.pod)
        .model_validate(
            {"env": [{"name": "WANDB_API_KEY", "secretKeyRef": {"name": "wandb", "key": "k"}}]}
        )
        .env[0]
    ]
    job = build_indexed_job(spec, owner, IMAGE)
    ctr = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in ctr["env"]}
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "wandb", "key": "k"}
    assert env["LORA_HF_TOKEN_FILE"]["value"].endswith("/token")
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["hf-token"]["secret"]["secretName"] == "hf-token"
    # pvc:// URIs become mounted claims, each once
    assert {
        v["persistentVolumeClaim"]["claimName"]
        for v in volumes.values()
        if "persistentVolumeClaim" in v
    } == {"datasets", "lora-outputs"}


def test_suspend_kueue_and_run_policy_pass_through() -> None:
    resource, owner = _load("quickstart")
    spec = resource.spec.model_copy(deep=True)
    assert build_indexed_job(spec, owner, IMAGE)["spec"]["suspend"] is False
    queued = build_indexed_job(spec, owner, IMAGE, queue_name="team-a")
    assert queued["spec"]["suspend"] is True  # Kueue owns suspend from here
    assert queued["metadata"]["labels"][c.KUEUE_QUEUE_LABEL] == "team-a"
    spec.run_policy.suspend = True
    spec.run_policy.active_deadline_seconds = 3600
    spec.run_policy.managed_by = "kueue.x-k8s.io/multikueue"
    js = build_indexed_job(spec, owner, IMAGE)["spec"]
    assert js["suspend"] is True and js["activeDeadlineSeconds"] == 3600
    assert js["managedBy"] == "kueue.x-k8s.io/multikueue"


def test_configmap_carries_the_fully_defaulted_spec() -> None:
    resource, owner = _load("quickstart")
    cm = build_spec_configmap(resource.spec, owner)
    assert cm["metadata"]["name"] == ChildNames("quickstart").configmap
    body = json.loads(cm["data"]["spec.json"])
    result = validate_body(body)
    assert result.ok and result.resource is not None
    assert result.resource.spec == resource.spec
    assert body["spec"]["health"]["consecutiveEvaluations"] == 3  # defaults are explicit
