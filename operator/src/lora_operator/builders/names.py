"""Deterministic child names, labels and the owner reference shared by every builder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_operator.api import constants as c

RENDEZVOUS_PORT = 29500
TRAINER_CONTAINER = "trainer"
SPEC_MOUNT = "/etc/lora-operator/spec"
SPEC_FILE = "spec.json"
PVC_ROOT = "/mnt/pvc"


@dataclass(frozen=True)
class Owner:
    """The LoRAFineTune that owns the children (from its metadata)."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        """ownerReference: garbage collection deletes the children with the job."""
        return {
            "apiVersion": c.API_VERSION,
            "kind": c.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class ChildNames:
    """Names of a job's children; all derived from the LoRAFineTune's name."""

    job: str

    @property
    def configmap(self) -> str:
        return f"{self.job}-spec"

    @property
    def service(self) -> str:
        return f"{self.job}-workers"

    @property
    def preflight(self) -> str:
        return f"{self.job}-preflight"

    def pod_hostname(self, index: int) -> str:
        """Stable DNS name of pod INDEX (Indexed Job hostname + subdomain)."""
        return f"{self.job}-{index}.{self.service}"


def selector_labels(owner: Owner) -> dict[str, str]:
    return {c.LABEL_JOB_NAME: owner.name}


def child_labels(owner: Owner, role: str) -> dict[str, str]:
    return {
        **selector_labels(owner),
        c.LABEL_ROLE: role,
        c.LABEL_MANAGED_BY: c.MANAGED_BY_VALUE,
        "app.kubernetes.io/name": "lora-operator",
        "app.kubernetes.io/instance": owner.name,
    }


def metadata(name: str, owner: Owner, role: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": child_labels(owner, role),
        "ownerReferences": [owner.reference()],
    }
