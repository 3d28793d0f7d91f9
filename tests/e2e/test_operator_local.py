"""The operator end to end on the local cluster: real kopf, real kubectl, the real trainer."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from lora_operator.api import constants as c
from lora_operator.local.ports import free_port
from tests.e2e.cluster import (
    CHILDREN,
    NS,
    PODS,
    ROOT,
    Cluster,
    condition,
    local_cluster,
    quickstart,
    until,
)

pytestmark = [pytest.mark.slow]


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
        counts = {k: len(v) for k, v in kids.items()}
        return kids if counts == {"configmaps": 1, "services": 1, "jobs": 2} else None

    kids = await until(one_of_each, timeout=90)  # the pre-flight pod passes first
    lft = await cluster.lft("quickstart")
    passed = condition(lft, c.COND_PREFLIGHT_PASSED)
    assert passed["status"] == "True" and passed["message"].startswith("pass"), passed
    for kind, children in kids.items():
        for child in children:
            (ref,) = child["metadata"]["ownerReferences"]
            assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
                c.KIND, "quickstart", uid, True), kind  # fmt: skip
    assert [j["metadata"]["name"] for j in kids["jobs"]] == ["quickstart-preflight", "quickstart"]
    job_uid = kids["jobs"][1]["metadata"]["uid"]

    async def running() -> Any:
        obj = await cluster.lft("quickstart")
        return obj if obj.get("status", {}).get("phase") == c.PHASE_RUNNING else None

    lft = await until(running, timeout=60)
    sel = f"{c.LABEL_JOB_NAME}=quickstart,{c.LABEL_ROLE}=trainer"
    (pod,) = await cluster.client.list(f"{PODS}?labelSelector={sel}")
    assert pod["metadata"]["ownerReferences"][0]["uid"] == job_uid
    assert condition(lft, c.COND_SPEC_ACCEPTED)["status"] == "True"
    assert condition(lft, c.COND_RUNNING)["observedGeneration"] == lft["metadata"]["generation"]

    # restart the operator mid-run (the trainer frozen meanwhile, so that it is mid-run
    # however long the stop takes): it resumes, creates nothing twice
    trainer = pod["metadata"]["name"]
    cluster.runner.signal_pod(NS, trainer, signal.SIGSTOP)
    await cluster.stop_operator()
    job = await cluster.client.get(CHILDREN["jobs"] + "/quickstart")
    assert job["status"]["active"] == 1, job["status"]  # still training while it was down
    await cluster.start_operator()
    cluster.runner.signal_pod(NS, trainer, signal.SIGCONT)
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
    assert {k: len(v) for k, v in kids.items()} == {"configmaps": 1, "services": 1, "jobs": 2}
    assert kids["jobs"][1]["metadata"]["uid"] == job_uid  # never recreated
    assert (out / "adapter").is_dir()

    final = (await cluster.lft("quickstart"))["status"]
    # what `kubectl get lft -o yaml` shows at the end: progress, metrics, health read live
    assert final["progress"]["percent"] == 100.0 and final["progress"]["step"] == 40, final
    assert 0 < final["metrics"]["loss"] < 10 and final["metrics"]["tokensPerSecond"] > 0, final
    assert condition(final and {"status": final}, c.COND_DEGRADED)["status"] == "False"
    header, row = (await cluster.kubectl("get", "lft")).splitlines()
    assert header.split()[:6] == ["NAME", "PHASE", "HEALTH", "STEP", "LOSS", "AGE"]
    assert row.split()[:2] == ["quickstart", "Succeeded"]

    async def reasons_once_succeeded() -> list[str] | None:  # Events trail the status
        events = await cluster.client.list(f"/api/v1/namespaces/{NS}/events")
        found = [e["reason"] for e in events if e["involvedObject"].get("name") == "quickstart"]
        return found if "Succeeded" in found else None

    reasons = await until(reasons_once_succeeded, timeout=15)
    assert reasons.count("Created") == 4, reasons
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
    """The `lora-operator run` entrypoint: flags, kubeconfig, /metrics and probes, SIGINT ends
    it with exit 0."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with local_cluster(tmp_path, operator=False) as cluster:
        proc = await asyncio.create_subprocess_exec(
            str(ROOT / ".venv" / "bin" / "lora-operator"), "run", "--standalone",
            "--namespace", NS, "--kubeconfig", str(cluster.kubeconfig),
            "--metrics-port", str(port), "--health-interval", "5",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)  # fmt: skip
        try:

            async def ready() -> bool:
                return (await asyncio.to_thread(http_get, f"{base}/readyz"))[0] == 200

            await until(ready, timeout=30)
            assert (await asyncio.to_thread(http_get, f"{base}/healthz"))[0] == 200
            await _invalid(cluster, tmp_path)
            code, text = await asyncio.to_thread(http_get, f"{base}/metrics")
            assert code == 200
            assert 'lora_operator_jobs{phase="Pending"} 1.0' in text, text
            assert "lora_operator_reconcile_duration_seconds_count" in text
        finally:
            proc.send_signal(signal.SIGINT)
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, out.decode()[-3000:]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (loopback)
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""
    except OSError:
        return 0, ""
