"""Pure builders: a LoRAFineTune -> the manifests of its children (no kopf, no API client)."""

from lora_operator.builders.configmap import build_spec_configmap
from lora_operator.builders.job import build_indexed_job
from lora_operator.builders.names import ChildNames, Owner
from lora_operator.builders.preflight import build_preflight_job
from lora_operator.builders.service import build_headless_service

__all__ = [
    "ChildNames",
    "Owner",
    "build_headless_service",
    "build_indexed_job",
    "build_preflight_job",
    "build_spec_configmap",
]
