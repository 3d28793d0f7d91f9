"""The Indexed batch/v1 Job: one pod per node, the whole gang as one unit."""

from __future__ import annotations

from typing import Any

from lora_operator.api import constants as c
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.builders.names import TRAINER_CONTAINER, Owner, metadata
from lora_operator.builders.pod import build_pod_template


def build_indexed_job(
    spec: LoRAFineTuneSpec,
    owner: Owner,
    image: str,
    queue_name: str | None = None,
) -> dict[str, Any]:
    """The training Job.

    backoffLimit 0: any pod failure fails the Job, and the operator restarts the whole gang
    (never half of it) within spec.runPolicy.backoffLimit. Exit 86 (a rank stopped on the
    health policy) maps to FailJob through podFailurePolicy, so it is told apart from an
    infrastructure failure and never retried. With a Kueue queue the Job starts suspended
    and Kueue owns `suspend`.
    """
    nodes = spec.distributed.nodes
    meta = metadata(owner.name, owner, "trainer")
    if queue_name is not None:
        meta["labels"][c.KUEUE_QUEUE_LABEL] = queue_name
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": TRAINER_CONTAINER,
                        "operator": "In",
                        "values": [c.EXIT_HEALTH_STOP],
                    },
                }
            ]
        },
        "suspend": spec.run_policy.suspend or queue_name is not None,
        "template": build_pod_template(spec, owner, image),
    }
    if spec.run_policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    if spec.run_policy.managed_by is not None:
        job_spec["managedBy"] = spec.run_policy.managed_by
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
