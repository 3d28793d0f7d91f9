"""The headless Service that gives the gang's pods stable DNS names for rendezvous."""

from __future__ import annotations

from typing import Any

from lora_operator.api import constants as c
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.builders.names import (
    RENDEZVOUS_PORT,
    ChildNames,
    Owner,
    metadata,
    selector_labels,
)


def build_headless_service(spec: LoRAFineTuneSpec, owner: Owner) -> dict[str, Any]:
    """clusterIP None + publishNotReadyAddresses: pods resolve before they are Ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(ChildNames(owner.name).service, owner, "rendezvous"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(owner),
            "ports": [
                {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT},
                {
                    "name": c.METRICS_PORT_NAME,
                    "port": spec.monitoring.port,
                    "targetPort": c.METRICS_PORT_NAME,
                },
            ],
        },
    }
