"""A kubeconfig for the emulated API (no credentials: it listens on loopback only)."""

from __future__ import annotations

from typing import Any


def kubeconfig(url: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "lora-local",
        "clusters": [{"name": "lora-local", "cluster": {"server": url}}],
        "contexts": [
            {"name": "lora-local", "context": {"cluster": "lora-local", "namespace": namespace}}
        ],
        "users": [{"name": "lora-local", "user": {}}],
    }
