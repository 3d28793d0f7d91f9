"""The ConfigMap holding the resolved training spec the pods read."""

from __future__ import annotations

import json
from typing import Any

from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.builders.names import SPEC_FILE, ChildNames, Owner, metadata


def build_spec_configmap(spec: LoRAFineTuneSpec, owner: Owner) -> dict[str, Any]:
    """The spec with every default applied, as JSON (`lora-train --spec` reads it)."""
    body = {
        "apiVersion": "lora-operator.dev/v1alpha1",
        "kind": "LoRAFineTune",
        "metadata": {"name": owner.name, "namespace": owner.namespace},
        "spec": spec.to_wire(),
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(ChildNames(owner.name).configmap, owner, "spec"),
        "data": {SPEC_FILE: json.dumps(body, indent=2, sort_keys=True)},
    }
