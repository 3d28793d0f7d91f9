"""The training pod template: container, env, volumes, resources, security context."""

from __future__ import annotations

from typing import Any

from lora_operator.api import constants as c
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.builders.names import (
    PVC_ROOT,
    RENDEZVOUS_PORT,
    SPEC_FILE,
    SPEC_MOUNT,
    TRAINER_CONTAINER,
    ChildNames,
    Owner,
    child_labels,
)

NON_ROOT_UID = 65532
HF_TOKEN_MOUNT = "/var/run/secrets/lora-operator/hf-token"
METRICS_DIR = "/tmp/prometheus"
TERMINATION_LOG = "/dev/termination-log"  # the kubelet's default terminationMessagePath


def pvc_claims(spec: LoRAFineTuneSpec) -> list[str]:
    """Claims named by pvc:// URIs of the spec, in first-use order, without duplicates."""
    uris = [
        spec.model.source,
        spec.model.tokenizer,
        spec.dataset.source,
        spec.dataset.eval_source,
        spec.output.uri,
    ]
    claims = [
        u.removeprefix("pvc://").split("/", 1)[0] for u in uris if u and u.startswith("pvc://")
    ]
    return list(dict.fromkeys(claims))


def _volumes(spec: LoRAFineTuneSpec, names: ChildNames) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "spec", "configMap": {"name": names.configmap}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm_size}},
        {"name": "tmp", "emptyDir": {}},
    ]
    volumes += [
        {"name": f"pvc-{claim}", "persistentVolumeClaim": {"claimName": claim}}
        for claim in pvc_claims(spec)
    ]
    ref = spec.model.token_secret_ref
    if ref is not None:
        volumes.append(
            {
                "name": "hf-token",
                "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": "token"}]},
            }
        )
    return volumes + list(spec.pod.volumes)


def _mounts(spec: LoRAFineTuneSpec) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    mounts += [
        {"name": f"pvc-{claim}", "mountPath": f"{PVC_ROOT}/{claim}"} for claim in pvc_claims(spec)
    ]
    if spec.model.token_secret_ref is not None:
        mounts.append({"name": "hf-token", "mountPath": HF_TOKEN_MOUNT, "readOnly": True})
    return mounts + list(spec.pod.volume_mounts)


def _env(spec: LoRAFineTuneSpec, owner: Owner, names: ChildNames) -> list[dict[str, Any]]:
    d = spec.distributed
    nproc = d.gpus_per_node if d.device == "cuda" else (d.processes_per_node or 1)
    env: list[dict[str, Any]] = [
        {"name": "LORA_JOB_NAME", "value": owner.name},
        {"name": "LORA_JOB_UID", "value": owner.uid},
        {"name": "LORA_NNODES", "value": str(d.nodes)},
        {"name": "LORA_NPROC_PER_NODE", "value": str(nproc)},
        {"name": "LORA_LAUNCHER", "value": d.launcher},
        {"name": "LORA_MASTER_ADDR", "value": names.pod_hostname(0)},
        {"name": "LORA_MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": "LORA_PVC_ROOT", "value": PVC_ROOT},
        {"name": "PROMETHEUS_MULTIPROC_DIR", "value": METRICS_DIR},
        {"name": "HOME", "value": "/tmp/home"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "LORA_TERMINATION_LOG", "value": TERMINATION_LOG},
    ]
    if spec.model.token_secret_ref is not None:
        env.append({"name": "LORA_HF_TOKEN_FILE", "value": f"{HF_TOKEN_MOUNT}/token"})
    for var in spec.pod.env:
        if var.secret_key_ref is not None:
            ref = var.secret_key_ref
            env.append(
                {
                    "name": var.name,
                    "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
                }
            )
        else:
            env.append({"name": var.name, "value": var.value})
    return env


def _resources(spec: LoRAFineTuneSpec) -> dict[str, Any]:
    r = spec.resources
    requests: dict[str, str] = {"cpu": r.cpu, "memory": r.memory}
    limits: dict[str, str] = {"memory": r.memory}
    if spec.distributed.device == "cuda" and spec.distributed.gpus_per_node > 0:
        requests[r.gpu_resource_name] = limits[r.gpu_resource_name] = str(
            spec.distributed.gpus_per_node
        )
    return {"requests": requests, "limits": limits}


def _container(spec: LoRAFineTuneSpec, owner: Owner, image: str) -> dict[str, Any]:
    names = ChildNames(owner.name)
    return {
        "name": TRAINER_CONTAINER,
        "image": image,
        "command": ["lora-train", "launch", "--", "--spec", f"{SPEC_MOUNT}/{SPEC_FILE}"],
        "env": _env(spec, owner, names),
        "ports": [
            {"name": c.METRICS_PORT_NAME, "containerPort": spec.monitoring.port},
            {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT},
        ],
        "resources": _resources(spec),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": _mounts(spec),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def build_pod_template(spec: LoRAFineTuneSpec, owner: Owner, image: str) -> dict[str, Any]:
    """Pod template of the Indexed Job: restricted Pod Security Standard compliant."""
    names = ChildNames(owner.name)
    p = spec.pod
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # required by podFailurePolicy; the gang restarts as one
        "subdomain": names.service,
        "containers": [_container(spec, owner, image)],
        "volumes": _volumes(spec, names),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": NON_ROOT_UID,
            "runAsGroup": NON_ROOT_UID,
            "fsGroup": NON_ROOT_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    optional = {
        "nodeSelector": dict(p.node_selector) or None,
        "tolerations": [t.to_wire() for t in p.tolerations] or None,
        "affinity": p.affinity,
        "priorityClassName": p.priority_class_name,
        "schedulerName": p.scheduler_name,
        "serviceAccountName": p.service_account_name,
    }
    pod_spec |= {k: v for k, v in optional.items() if v is not None}
    return {
        "metadata": {
            "labels": {**p.labels, **child_labels(owner, "trainer")},
            "annotations": dict(p.annotations),
        },
        "spec": pod_spec,
    }
