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
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from lora_operator.api import constants as c
from lora_operator.controller.settings import OperatorConfig
from lora_operator.dev.cluster import DevCluster, dev_cluster
from tests.conftest import EXAMPLES, deep_merge

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = ROOT / ".venv" / "bin" / "kubectl"
NS = "default"
LFTS = f"/apis/{c.API_VERSION}/namespaces/{NS}/{c.PLURAL}"
CHILDREN = {
    "configmaps": f"/api/v1/namespaces/{NS}/configmaps",
    "services": f"/api/v1/namespaces/{NS}/services",
    "jobs": f"/apis/batch/v1/namespaces/{NS}/jobs",
}
PODS = f"/api/v1/namespaces/{NS}/pods"


class Cluster(DevCluster):
    """The dev cluster plus what the tests read: kubectl, the job, its children."""

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
    """The emulated API (with the CRD), the pod runner and the operator (fast health ticks)."""
    config = OperatorConfig(
        "ignored:0.1",
        (NS,),
        watch_timeout_seconds=5,
        health_interval_seconds=2.0,
        health_timeout_seconds=2.0,
        metrics_port=None,
    )
    async with dev_cluster(tmp_path / "state", config, operator=operator, cls=Cluster) as cl:
        yield cl


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
