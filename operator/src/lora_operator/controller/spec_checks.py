"""Semantic checks the CRD cannot express: collisions with what the operator generates.

A spec that passes the API server's schema and CEL rules may still clash with the pod the
operator builds (an env variable or volume the operator sets, the rendezvous port) or break
the operator's policy (the image allow-list). Each problem names the field and the fix; the
operator reports them as SpecAccepted=False and creates nothing.
"""

from __future__ import annotations

from typing import Any

from lora_operator.api import constants as c
from lora_operator.api.pod import PodSpecOverrides
from lora_operator.api.schema_check import Problem
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.builders.names import RENDEZVOUS_PORT, Owner, child_labels
from lora_operator.builders.pod import build_pod_template
from lora_operator.controller.settings import OperatorConfig

# Set on every pod by the Job controller (Indexed completion mode).
JOB_ENV = ("JOB_COMPLETION_INDEX",)


def semantic_problems(spec: LoRAFineTuneSpec, config: OperatorConfig) -> list[Problem]:
    """Problems of a schema-valid spec, sorted by field path (empty: accepted)."""
    own = _operator_pod(spec)
    problems = [
        *_env_problems(spec, own),
        *_volume_problems(spec, own),
        *_label_problems(spec),
        *_image_problems(spec, config),
    ]
    if spec.monitoring.port == RENDEZVOUS_PORT:
        problems.append(
            Problem(
                "spec.monitoring.port",
                f"{RENDEZVOUS_PORT} is the rendezvous port of the training pods; "
                "choose another port",
            )
        )
    return sorted(problems, key=lambda p: p.path)


def _operator_pod(spec: LoRAFineTuneSpec) -> dict[str, Any]:
    """The container the operator builds without any user overrides."""
    bare = spec.model_copy(update={"pod": PodSpecOverrides()})
    template = build_pod_template(bare, Owner("x", "x", "x"), "image")
    container: dict[str, Any] = template["spec"]["containers"][0]
    return {
        "env": {e["name"] for e in container["env"]} | set(JOB_ENV),
        "volumes": {v["name"] for v in template["spec"]["volumes"]},
        "mounts": {m["mountPath"] for m in container["volumeMounts"]},
    }


def _env_problems(spec: LoRAFineTuneSpec, own: dict[str, Any]) -> list[Problem]:
    problems, seen = [], set()
    for i, var in enumerate(spec.pod.env):
        path = f"spec.pod.env[{i}].name"
        if var.name in own["env"]:
            problems.append(Problem(path, f"{var.name} is set by the operator; use another name"))
        elif var.name in seen:
            problems.append(Problem(path, f"{var.name} is set twice; keep one"))
        seen.add(var.name)
    return problems


def _volume_problems(spec: LoRAFineTuneSpec, own: dict[str, Any]) -> list[Problem]:
    problems, names = [], set(own["volumes"])
    for i, volume in enumerate(spec.pod.volumes):
        name = volume.get("name")
        path = f"spec.pod.volumes[{i}].name"
        if not isinstance(name, str) or not name:
            problems.append(Problem(path, "required: give the volume a name"))
        elif name in own["volumes"] or name.startswith("pvc-"):
            problems.append(Problem(path, f"{name!r} is a volume of the operator; rename it"))
        elif name in names:
            problems.append(Problem(path, f"{name!r} is declared twice; keep one"))
        else:
            names.add(name)
    for i, mount in enumerate(spec.pod.volume_mounts):
        base = f"spec.pod.volumeMounts[{i}]"
        if mount.get("name") not in names:
            problems.append(
                Problem(f"{base}.name", f"{mount.get('name')!r} names no volume of the pod")
            )
        mount_path = mount.get("mountPath")
        if not isinstance(mount_path, str) or not mount_path.startswith("/"):
            problems.append(Problem(f"{base}.mountPath", "required: an absolute path"))
        elif mount_path.rstrip("/") in own["mounts"]:
            problems.append(
                Problem(f"{base}.mountPath", f"{mount_path} is mounted by the operator")
            )
    return problems


def _label_problems(spec: LoRAFineTuneSpec) -> list[Problem]:
    reserved = set(child_labels(Owner("x", "x", "x"), "trainer"))
    return [
        Problem(f"spec.pod.labels[{key}]", "the operator sets this label; remove it")
        for key in spec.pod.labels
        if key in reserved or key.startswith(c.LABEL_PREFIX)
    ]


def _image_problems(spec: LoRAFineTuneSpec, config: OperatorConfig) -> list[Problem]:
    if spec.image is None or not config.image_allowlist:
        return []
    if any(spec.image.startswith(prefix) for prefix in config.image_allowlist):
        return []
    allowed = ", ".join(config.image_allowlist)
    return [Problem("spec.image", f"{spec.image} is not allowed here; use an image from {allowed}")]
