"""The LoRAFineTune CustomResourceDefinition, generated from the API models."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import yaml

from lora_operator.api import constants as c
from lora_operator.api.openapi import Schema, model_schema
from lora_operator.api.resource import MAX_NAME_LENGTH, NAME_PATTERN
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.api.status import LoRAFineTuneStatus

HEADER = (
    "# Generated from lora_operator.api by `make crds`; do not edit by hand.\n"
    "# A test fails when this file drifts from the models.\n"
)
CRD_FILE = f"{c.CRD_NAME}.yaml"

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Health", "type": "string", "jsonPath": ".status.health.verdict"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.metrics.loss"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {
        "name": "Progress",
        "type": "string",
        "jsonPath": ".status.progress.percent",
        "priority": 1,
        "description": "Percent of planned steps done.",
    },
    {
        "name": "Eval-Loss",
        "type": "number",
        "jsonPath": ".status.metrics.evalLoss",
        "priority": 1,
    },
    {
        "name": "Tokens/s",
        "type": "number",
        "jsonPath": ".status.metrics.tokensPerSecond",
        "priority": 1,
        "description": "Training throughput.",
    },
    {
        "name": "ETA-s",
        "type": "number",
        "jsonPath": ".status.progress.etaSeconds",
        "priority": 1,
        "description": "Estimated seconds left.",
    },
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": ".status.health.reason",
        "priority": 1,
        "description": "The most severe firing health rule.",
    },
]


@lru_cache(maxsize=1)
def resource_schema() -> Schema:
    """openAPIV3Schema of the whole object (what the API server validates on write)."""
    return {
        "type": "object",
        "description": "A LoRA fine-tuning job with training-health monitoring.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "lora-operator.dev/v1alpha1"},
            "kind": {"type": "string", "description": "LoRAFineTune"},
            "metadata": {"type": "object"},
            "spec": model_schema(LoRAFineTuneSpec),
            "status": model_schema(LoRAFineTuneStatus),
        },
        "x-kubernetes-validations": [
            {
                "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
                "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters "
                "(child names add suffixes within the 63-character DNS label limit)",
                "fieldPath": ".metadata.name",
            },
            {
                "rule": f"self.metadata.name.matches('{NAME_PATTERN}')",
                "message": "metadata.name must be a DNS-1035 label: lowercase letters, digits "
                "and '-', starting with a letter (it names Services and pod hostnames)",
                "fieldPath": ".metadata.name",
            },
        ],
    }


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": c.CRD_NAME,
            "labels": {"app.kubernetes.io/name": "lora-operator"},
        },
        "spec": {
            "group": c.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": c.KIND,
                "listKind": f"{c.KIND}List",
                "plural": c.PLURAL,
                "singular": c.SINGULAR,
                "shortNames": list(c.SHORT_NAMES),
                "categories": list(c.CATEGORIES),
            },
            "versions": [
                {
                    "name": c.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": resource_schema()},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


def render_crd() -> str:
    """The CRD file's text: header + YAML (stable key order, so drift is a real change)."""
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100)
