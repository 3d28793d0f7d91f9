"""The operator end to end on the local cluster: real kopf, real kubectl, the real trainer.

The emulated API server and the local pod runner (Job controller + kubelet running each pod's
command as local processes) run in this test's event loop, the operator (kopf with
lora-operator's handlers) in a thread with its own loop, or as `lora-operator run`; kubectl
runs as a subprocess against the emulated API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_operator.api import constants as c
from lora_operator.cli.local_api import kubeconfig
from lora_operator.controller.handlers import operate
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

pytestmark = [pytest.mark.slow]


@dataclass
class Cluster:
    api: LocalApiServer
    runner: PodRunner
    client: KubeClient
    kubeconfig: Path
    config: OperatorConfig
    operator: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    async def start_operator(self) -> None:
        """The operator in its own thread and loop, as in a separate process: on stop, kopf
        cancels every task its loop started (here: none of the runner's)."""
        self.stop, ready = threading.Event(), threading.Event()
        stop = self.stop

        def serve() -> None:
            asyncio.run(operate(self.config, standalone=True, stop_flag=stop, ready_flag=ready))

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
        sel = f"?labelSelector={c.LABEL_JOB_NAME}={name}"
        return {kind: await self.client.list(url + sel) for kind, url in CHILDREN.items()}


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
        config = OperatorConfig("ignored:0.1", (NS,), kubeconfig=path, watch_timeout_seconds=5)
        cl = Cluster(api, runner, client, path, config)
        if operator:
            await cl.start_operator()
        try:
            yield cl
        finally:
            if cl.operator is not None:
                await cl.stop_operator()


@pytest.fixture(autouse=True)
def _kubectl() -> None:
    if not KUBECTL.exists():
        pytest.skip("kubectl missing: bash scripts/install-tools.sh .venv")


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


@pytest.mark.training
async def test_quickstart_trains_to_succeeded_across_an_operator_restart(
    tiny_assets: Any, tmp_path: Path
) -> None:
    async with local_cluster(tmp_path) as cluster:
        await _quickstart(cluster, Path(tiny_assets.model_dir).parent, tmp_path)


async def test_semantically_invalid_spec_is_refused_naming_the_field(tmp_path: Path) -> None:
    async with local_cluster(tmp_path) as cluster:
        await _invalid(cluster, tmp_path)


async def _quickstart(cluster: Cluster, tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    manifest = quickstart(tiny_dir, out)
    assert "created" in await cluster.kubectl(
        "apply", "--validate=false", "-f", "-", stdin=manifest
    )
    lft = await cluster.lft("quickstart")
    uid = lft["metadata"]["uid"]

    async def one_of_each() -> Any:
        kids = await cluster.children("quickstart")
        return kids if all(len(v) == 1 for v in kids.values()) else None

    kids = await until(one_of_each)
    for kind, (child,) in kids.items():
        (ref,) = child["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
            c.KIND, "quickstart", uid, True), kind  # fmt: skip
    job_uid = kids["jobs"][0]["metadata"]["uid"]

    async def running() -> Any:
        obj = await cluster.lft("quickstart")
        return obj if obj.get("status", {}).get("phase") == c.PHASE_RUNNING else None

    lft = await until(running, timeout=60)
    (pod,) = await cluster.client.list(f"{PODS}?labelSelector={c.LABEL_JOB_NAME}=quickstart")
    assert pod["metadata"]["ownerReferences"][0]["uid"] == job_uid
    assert condition(lft, c.COND_SPEC_ACCEPTED)["status"] == "True"
    assert condition(lft, c.COND_RUNNING)["observedGeneration"] == lft["metadata"]["generation"]

    # restart the operator mid-run: it resumes, creates nothing twice
    await cluster.stop_operator()
    job = await cluster.client.get(CHILDREN["jobs"] + "/quickstart")
    assert job["status"]["active"] == 1, job["status"]  # still training while it was down
    await cluster.start_operator()
    # a training field changed after start is refused, naming the field; the job runs on
    await cluster.kubectl("patch", "lft", "quickstart", "--type=merge",
                          "-p", json.dumps({"spec": {"lora": {"r": 8}}}))  # fmt: skip

    async def refused() -> Any:
        cond = condition(await cluster.lft("quickstart"), c.COND_SPEC_ACCEPTED)
        return cond if cond and cond["status"] == "False" else None

    cond = await until(refused)
    assert cond["reason"] == c.REASON_IMMUTABLE_FIELD and "spec.lora.r" in cond["message"]

    await cluster.kubectl("wait", "--for=jsonpath={.status.phase}=Succeeded",
                          "lft/quickstart", "--timeout=240s")  # fmt: skip
    await cluster.kubectl("wait", "--for=condition=Succeeded", "lft/quickstart", "--timeout=5s")
    kids = await cluster.children("quickstart")
    assert {k: len(v) for k, v in kids.items()} == {"configmaps": 1, "services": 1, "jobs": 1}
    assert kids["jobs"][0]["metadata"]["uid"] == job_uid  # never recreated
    assert (out / "adapter").is_dir()

    header, row = (await cluster.kubectl("get", "lft")).splitlines()
    assert header.split()[:6] == ["NAME", "PHASE", "HEALTH", "STEP", "LOSS", "AGE"]
    assert row.split()[:2] == ["quickstart", "Succeeded"]
    events = await cluster.client.list(f"/api/v1/namespaces/{NS}/events")
    reasons = [e["reason"] for e in events if e["involvedObject"].get("name") == "quickstart"]
    assert reasons.count("Created") == 3 and "Succeeded" in reasons, reasons
    assert c.REASON_IMMUTABLE_FIELD in reasons


async def _invalid(cluster: Cluster, tmp_path: Path) -> None:
    # passes the CRD (schema + CEL) but collides with a variable the operator sets
    env = {"pod": {"env": [{"name": "LORA_NNODES", "value": "4"}]}}
    manifest = quickstart(tmp_path / "tiny", tmp_path / "run", env).replace(
        "name: quickstart", "name: clash"
    )
    assert "created" in await cluster.kubectl(
        "apply", "--validate=false", "-f", "-", stdin=manifest
    )
    await cluster.kubectl("wait", "--for=condition=SpecAccepted=False", "lft/clash",
                          "--timeout=30s")  # fmt: skip
    lft = await cluster.lft("clash")
    cond = condition(lft, c.COND_SPEC_ACCEPTED)
    assert cond["reason"] == c.REASON_INVALID_SPEC
    assert "spec.pod.env[0].name" in cond["message"] and "LORA_NNODES" in cond["message"]
    assert lft["status"]["phase"] == c.PHASE_PENDING
    await asyncio.sleep(1.0)  # give a (wrong) child the chance to appear
    assert await cluster.children("clash") == {"configmaps": [], "services": [], "jobs": []}


async def test_lora_operator_run_serves_until_interrupted(tmp_path: Path) -> None:
    """The `lora-operator run` entrypoint: flags, kubeconfig, SIGINT ends it with exit 0."""
    async with local_cluster(tmp_path, operator=False) as cluster:
        proc = await asyncio.create_subprocess_exec(
            str(ROOT / ".venv" / "bin" / "lora-operator"), "run", "--standalone",
            "--namespace", NS, "--kubeconfig", str(cluster.kubeconfig),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)  # fmt: skip
        try:
            await _invalid(cluster, tmp_path)
        finally:
            proc.send_signal(signal.SIGINT)
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, out.decode()[-3000:]
