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

    @property
    def cluster_wide(self) -> bool:
        return not self.namespaces

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        return cls(
            trainer_image=env.get(ENV_TRAINER_IMAGE) or DEFAULT_TRAINER_IMAGE,
            namespaces=_split(env.get(ENV_NAMESPACES, "")),
            image_allowlist=_split(env.get(ENV_IMAGE_ALLOWLIST, "")),
        )


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())
