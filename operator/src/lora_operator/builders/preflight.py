"""The pre-flight Job: one pod runs `lora-train --preflight` before any training pod starts."""

from __future__ import annotations

import copy
from typing import Any

from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.builders.job import build_indexed_job
from lora_operator.builders.names import SPEC_FILE, SPEC_MOUNT, ChildNames, Owner, metadata
from lora_operator.builders.pod import TERMINATION_LOG

PREFLIGHT_DEADLINE_SECONDS = 3600  # loading a large base model from a volume takes a while


def build_preflight_job(spec: LoRAFineTuneSpec, owner: Owner, image: str) -> dict[str, Any]:
    """A one-pod Job with the training pod's volumes, env and security context.

    The container writes its verdict and the failing checks to the termination log; the
    operator reads them from the pod's status (exit 0 pass, 10 warn, 20 fail). One process
    on one device: the checks are per-model, not per-rank. Never retried.
    """
    job = build_indexed_job(spec, owner, image)
    job["metadata"] = metadata(ChildNames(owner.name).preflight, owner, "preflight")
    jspec = job["spec"]
    jspec |= {"completions": 1, "parallelism": 1, "suspend": False}
    jspec["activeDeadlineSeconds"] = PREFLIGHT_DEADLINE_SECONDS
    jspec.pop("podFailurePolicy", None)
    jspec.pop("managedBy", None)
    template = jspec["template"]
    template["metadata"]["labels"] |= job["metadata"]["labels"]
    template["spec"].pop("subdomain", None)
    container = template["spec"]["containers"][0]
    container["command"] = [
        "lora-train",
        "--spec",
        f"{SPEC_MOUNT}/{SPEC_FILE}",
        "--preflight",
        "--termination-log",
        TERMINATION_LOG,
    ]
    container["terminationMessagePath"] = TERMINATION_LOG
    container["terminationMessagePolicy"] = "FallbackToLogsOnError"
    container.pop("ports", None)
    skip = ("LORA_NNODES", "LORA_NPROC_PER_NODE", "LORA_TERMINATION_LOG")
    container["env"] = [e for e in container["env"] if e["name"] not in skip]
    resources = copy.deepcopy(container["resources"])
    gpu = spec.resources.gpu_resource_name
    for part in ("requests", "limits"):
        if gpu in resources.get(part, {}):
            resources[part][gpu] = "1"
    container["resources"] = resources
    return job
