"""The local cluster for end-to-end tests: real kopf, real kubectl, the real trainer.

The emulated API server and the local pod runner (Job controller + kubelet running each pod's
command as local processes) run in this test's event loop, the operator (kopf with
lora-operator's handlers) in a thread with its own loop, or as `lora-operator run`; kubectl
runs as a subprocess against the emulated API.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_operator.api import constants as c
from lora_operator.cli.local_api import kubeconfig
from lora_operator.controller.handlers import operate
from lora_operator.controller.metrics import OperatorMetrics
from lora_operator.controller.settings import OperatorConfig
from lora_operator.local import LocalApiServer, PodRunner
from lora_operator.local.kubeapi import KubeClient
from tests.conftest import EXAMPLES, deep_merge

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = ROOT / ".venv" / "bin" / "kubectl"
CRD = yaml.safe_load((ROOT / "crds" / "lorafinetunes.lora-operator.dev.yaml").read_text())
NS = "default"
LFTS = f"/apis/{c.API_VERSION}/namespaces/{NS}/{c.PLURAL}"
CHILDREN = {
    "configmaps": f"/api/v1/namespaces/{NS}/configmaps",
    "services": f"/api/v1/namespaces/{NS}/services",
    "jobs": f"/apis/batch/v1/namespaces/{NS}/jobs",
}
PODS = f"/api/v1/namespaces/{NS}/pods"


@dataclass
class Cluster:
    api: LocalApiServer
    runner: PodRunner
    client: KubeClient
    kubeconfig: Path
    config: OperatorConfig
    operator: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)

    async def start_operator(self) -> None:
        """The operator in its own thread and loop, as in a separate process: on stop, kopf
        cancels every task its loop started (here: none of the runner's)."""
        self.stop, ready = threading.Event(), threading.Event()
        stop = self.stop

        def serve() -> None:
            asyncio.run(
                operate(self.config, stop_flag=stop, ready_flag=ready, metrics=self.metrics)
            )

        self.operator = threading.Thread(target=serve, daemon=True)
        self.operator.start()
        assert await asyncio.to_thread(ready.wait, 20), "the operator did not start"

    async def stop_operator(self) -> None:
        assert self.operator is not None
        self.stop.set()
        await asyncio.to_thread(self.operator.join, 60)
        assert not self.operator.is_alive(), "the operator did not stop"
        self.operator = None

    async def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        cache = str(self.kubeconfig.with_suffix(".cache"))
        env = {"KUBECONFIG": str(self.kubeconfig), "KUBECACHEDIR": cache, "PATH": "/usr/bin"}
        out = await asyncio.to_thread(
            subprocess.run, [str(KUBECTL), *args], env=env, input=stdin, text=True,
            capture_output=True, timeout=180)  # fmt: skip
        assert not check or out.returncode == 0, (args, out.stderr)
        return out.stdout

    async def lft(self, name: str) -> Any:
        return await self.client.get(f"{LFTS}/{name}")

    async def children(self, name: str) -> dict[str, list[Any]]:
        """The job's children by kind, pre-flight Job first when there is one."""
        sel = f"?labelSelector={c.LABEL_JOB_NAME}={name}"
        kids = {kind: await self.client.list(url + sel) for kind, url in CHILDREN.items()}
        kids["jobs"].sort(key=lambda j: j["metadata"]["name"] != f"{name}-preflight")
        return kids


@contextlib.asynccontextmanager
async def local_cluster(tmp_path: Path, operator: bool = True) -> AsyncIterator[Cluster]:
    """The emulated API (with the CRD), the pod runner and the operator."""
    path = tmp_path / "kubeconfig"
    async with (
        LocalApiServer.running() as api,
        PodRunner.running(api.api_url, tmp_path / "state") as runner,
        KubeClient(api.api_url) as client,
    ):
        api.pod_logs = runner.log_path
        path.write_text(yaml.safe_dump(kubeconfig(api.api_url)))
        await client.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", CRD)
        config = OperatorConfig(
            "ignored:0.1",
            (NS,),
            kubeconfig=path,
            watch_timeout_seconds=5,
            health_interval_seconds=2.0,
            health_timeout_seconds=2.0,
            metrics_port=None,
        )
        cl = Cluster(api, runner, client, path, config)
        if operator:
            await cl.start_operator()
        try:
            yield cl
        finally:
            if cl.operator is not None:
                await cl.stop_operator()


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := await check():
            return result
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached in time")


def condition(obj: Any, ctype: str) -> Any:
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return next((x for x in conds if x["type"] == ctype), None)


def quickstart(tiny_dir: Path, out: Path, patch: dict[str, Any] | None = None) -> str:
    """examples/quickstart.yaml on the tiny assets, a few steps, writing under OUT."""
    text = (
        (EXAMPLES / "quickstart.yaml").read_text().replace("/tmp/lora-operator/tiny", str(tiny_dir))
    )
    short = {
        "training": {"maxSteps": 40, "checkpointEverySteps": 100,
                     "eval": {"metrics": ["loss"], "everySteps": 100}},
        "output": {"uri": f"file://{out}"},
    }  # fmt: skip
    body = deep_merge(yaml.safe_load(text), {"spec": deep_merge(short, patch or {})})
    return yaml.safe_dump(body)
