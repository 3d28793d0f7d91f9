"""The operator's settings: from the environment, overridden by `lora-operator run` flags.

Pure (no kopf, no Kubernetes client): reconcile reads the trainer image and the image
allow-list from here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_TRAINER_IMAGE = "LORA_OPERATOR_TRAINER_IMAGE"
ENV_NAMESPACES = "LORA_OPERATOR_NAMESPACES"
ENV_IMAGE_ALLOWLIST = "LORA_OPERATOR_IMAGE_ALLOWLIST"
ENV_HEALTH_INTERVAL = "LORA_OPERATOR_HEALTH_INTERVAL_SECONDS"
ENV_METRICS_PORT = "LORA_OPERATOR_METRICS_PORT"
ENV_PEERING = "LORA_OPERATOR_PEERING"
DEFAULT_TRAINER_IMAGE = "ghcr.io/lora-operator/trainer:0.1.0"


@dataclass(frozen=True)
class OperatorConfig:
    """What the operator runs with.

    namespaces empty means cluster-wide. image_allowlist holds image prefixes a spec's
    `image` must start with (empty: any image).
    """

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    namespaces: tuple[str, ...] = ()
    image_allowlist: tuple[str, ...] = ()
    kubeconfig: Path | None = None  # None: in-cluster, else $KUBECONFIG or ~/.kube/config
    watch_timeout_seconds: int = 60  # server-side watch timeout; bounds how long a stop takes
    health_interval_seconds: float = 15.0  # how often each running job's /health is read
    health_timeout_seconds: float = 5.0  # one /health read
    metrics_host: str = "0.0.0.0"  # noqa: S104 (the pod's own address; probes come from kubelet)
    metrics_port: int | None = 8080  # /metrics, /healthz, /readyz; None: not served
    peering: str | None = None  # kopf peering name for HA replicas; None: standalone

    @property
    def cluster_wide(self) -> bool:
        return not self.namespaces

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        interval = env.get(ENV_HEALTH_INTERVAL)
        port = env.get(ENV_METRICS_PORT)
        return cls(
            trainer_image=env.get(ENV_TRAINER_IMAGE) or DEFAULT_TRAINER_IMAGE,
            namespaces=_split(env.get(ENV_NAMESPACES, "")),
            image_allowlist=_split(env.get(ENV_IMAGE_ALLOWLIST, "")),
            health_interval_seconds=_positive(ENV_HEALTH_INTERVAL, interval) if interval else 15.0,
            metrics_port=int(_positive(ENV_METRICS_PORT, port)) if port else 8080,
            peering=env.get(ENV_PEERING) or None,
        )


def _positive(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"{name}={text!r}: expected a positive number")
    return value


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())
