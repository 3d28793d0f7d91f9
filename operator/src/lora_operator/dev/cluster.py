"""A whole cluster on this machine: the emulated API with the CRD, the local pod runner, and
the operator (kopf, in a thread with its own event loop, as if it were its own process).

Used by `lora-operator dev` and by the end-to-end tests. The operator's loop is separate
because kopf cancels every task its loop started when it stops; the API server and the pod
runner stay in the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_operator.api import constants as c
from lora_operator.api.crd import build_crd
from lora_operator.controller.handlers import operate
from lora_operator.controller.metrics import OperatorMetrics
from lora_operator.controller.settings import OperatorConfig
from lora_operator.local import LocalApiServer, PodRunner
from lora_operator.local.kubeapi import KubeClient
from lora_operator.local.kubeconfig import kubeconfig

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
DEV_NAMESPACE = "default"


@dataclass
class DevCluster:
    """The running pieces; `operator_running` tells whether the operator thread is up."""

    api: LocalApiServer
    runner: PodRunner
    client: KubeClient
    kubeconfig: Path
    config: OperatorConfig
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    operator: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def operator_running(self) -> bool:
        return self.operator is not None and self.operator.is_alive()

    async def start_operator(self, timeout: float = 30.0) -> None:
        """Start the operator in its own thread and loop; return once it watches."""
        self.stop, ready = threading.Event(), threading.Event()
        stop, metrics, config = self.stop, self.metrics, self.config

        def serve() -> None:
            asyncio.run(operate(config, stop_flag=stop, ready_flag=ready, metrics=metrics))

        self.operator = threading.Thread(target=serve, name="lora-operator", daemon=True)
        self.operator.start()
        if not await asyncio.to_thread(ready.wait, timeout):
            raise RuntimeError("the operator did not start")

    async def stop_operator(self, timeout: float = 60.0) -> None:
        if self.operator is None:
            return
        self.stop.set()
        await asyncio.to_thread(self.operator.join, timeout)
        if self.operator.is_alive():
            raise RuntimeError("the operator did not stop")
        self.operator = None

    async def apply(self, body: dict[str, Any], namespace: str = DEV_NAMESPACE) -> dict[str, Any]:
        """Create a LoRAFineTune (as `kubectl create` would)."""
        path = f"/apis/{c.API_VERSION}/namespaces/{namespace}/{c.PLURAL}"
        body = {**body, "metadata": {**body.get("metadata", {}), "namespace": namespace}}
        created: dict[str, Any] = await self.client.create(path, body)
        return created

    async def lorafinetunes(self, namespace: str = DEV_NAMESPACE) -> list[dict[str, Any]]:
        return list(
            await self.client.list(f"/apis/{c.API_VERSION}/namespaces/{namespace}/{c.PLURAL}")
        )


@contextlib.asynccontextmanager
async def dev_cluster(
    state: Path,
    config: OperatorConfig | None = None,
    *,
    port: int = 0,
    kubeconfig_path: Path | None = None,
    operator: bool = True,
    cls: type[DevCluster] = DevCluster,
) -> AsyncIterator[Any]:
    """API (+ CRD), pod runner and operator; everything stops and every pod's processes are
    killed on exit. CONFIG's kubeconfig is replaced by the one written for this API."""
    path = kubeconfig_path or state / "kubeconfig"
    path.parent.mkdir(parents=True, exist_ok=True)
    async with (
        LocalApiServer.running(port=port) as api,
        PodRunner.running(api.api_url, state / "runner") as runner,
        KubeClient(api.api_url) as client,
    ):
        api.pod_logs = runner.log_path  # `kubectl logs` reads the runner's log files
        path.write_text(yaml.safe_dump(kubeconfig(api.api_url)))
        await client.create(CRDS, build_crd())
        base = config or OperatorConfig(namespaces=(DEV_NAMESPACE,))
        cfg = dataclasses.replace(base, kubeconfig=path)
        cluster = cls(api, runner, client, path, cfg)
        if operator:
            await cluster.start_operator()
        try:
            yield cluster
        finally:
            with contextlib.suppress(RuntimeError):
                await cluster.stop_operator()
