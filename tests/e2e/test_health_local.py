"""Health end to end on the local cluster: the collapse demo with each onDegraded policy, a
failing pre-flight, a trainer whose /health stops answering, an operator restart while a
job is Degraded. Real kopf, real kubectl, real trainer processes on the tiny model."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_operator.api import constants as c
from lora_operator.controller.reconcile import ANNOTATION_HEALTH_SUSPEND
from tests.conftest import EXAMPLES, deep_merge
from tests.e2e.cluster import NS, PODS, Cluster, condition, local_cluster, quickstart, until

pytestmark = [pytest.mark.slow, pytest.mark.training]
EVENTS = f"/api/v1/namespaces/{NS}/events"


def collapse(tiny_dir: Path, out: Path, name: str, patch: dict[str, Any]) -> str:
    """examples/collapse-demo.yaml on the tiny assets under NAME, writing under OUT."""
    text = (EXAMPLES / "collapse-demo.yaml").read_text()
    body = yaml.safe_load(text.replace("/tmp/lora-operator/tiny", str(tiny_dir)))
    body["metadata"]["name"] = name
    body["spec"]["output"]["uri"] = f"file://{out / name}"
    return yaml.safe_dump(deep_merge(body, {"spec": patch}))


async def events_of(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    return [e for e in await cluster.client.list(EVENTS) if e["involvedObject"]["name"] == name]


async def collapse_warnings(cluster: Cluster) -> list[dict[str, Any]]:
    """collapse-alert's Warning Events for the collapse rule (kopf posts Events from a queue,
    a moment after the status patch that they accompany)."""
    return [
        e for e in await events_of(cluster, "collapse-alert")
        if e["type"] == "Warning" and e["reason"] == c.RULE_LORA_GRADIENT_COLLAPSE
    ]  # fmt: skip


async def trainer_pods(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    sel = f"{c.LABEL_JOB_NAME}={name},{c.LABEL_ROLE}=trainer"
    return list(await cluster.client.list(f"{PODS}?labelSelector={sel}"))


async def wait_condition(
    cluster: Cluster, name: str, ctype: str, status: str, timeout: float
) -> Any:
    async def check() -> Any:
        lft = await cluster.lft(name)
        cond = condition(lft, ctype)
        return lft if cond and cond["status"] == status else None

    return await until(check, timeout=timeout)


async def wait_phase(cluster: Cluster, name: str, phase: str, timeout: float) -> Any:
    async def check() -> Any:
        lft = await cluster.lft(name)
        return lft if (lft.get("status") or {}).get("phase") == phase else None

    return await until(check, timeout=timeout)


async def test_collapse_demo_policies_preflight_and_operator_restart(
    tiny_assets: Any, tmp_path: Path
) -> None:
    tiny = Path(tiny_assets.model_dir).parent
    out = tmp_path / "runs"

    def policy(name: str) -> dict[str, Any]:
        return {"health": {"onDegraded": name, "preflight": {"enabled": False}}}

    manifests = [
        collapse(tiny, out, "collapse-demo", {}),  # the example as is: onDegraded Suspend
        collapse(tiny, out, "collapse-fail", policy("Fail")),
        collapse(tiny, out, "collapse-alert", policy("Alert")),
        quickstart(tiny, out / "bad", {"lora": {"targetModules": ["no_such_proj"]}}).replace(
            "name: quickstart", "name: bad-targets"
        ),
        # passes the CRD but collides with a variable the operator sets: refused, alone
        quickstart(
            tiny, out / "clash", {"pod": {"env": [{"name": "LORA_NNODES", "value": "4"}]}}
        ).replace("name: quickstart", "name: clash"),
    ]
    async with local_cluster(tmp_path) as cluster:
        await cluster.kubectl("apply", "--validate=false", "-f", "-", stdin="---\n".join(manifests))

        # a pre-flight failure ends Failed before any training pod exists, naming the check
        bad = await wait_phase(cluster, "bad-targets", c.PHASE_FAILED, timeout=120)
        pre = condition(bad, c.COND_PREFLIGHT_PASSED)
        assert pre["status"] == "False" and pre["reason"] == "PreflightFailed", pre
        assert "adapter" in pre["message"] and "no_such_proj" in pre["message"], pre
        assert await trainer_pods(cluster, "bad-targets") == []
        jobs = await cluster.children("bad-targets")
        assert [j["metadata"]["name"] for j in jobs["jobs"]] == ["bad-targets-preflight"]
        clash = await wait_condition(cluster, "clash", c.COND_SPEC_ACCEPTED, "False", 30)
        refused = condition(clash, c.COND_SPEC_ACCEPTED)
        assert refused["status"] == "False" and "spec.pod.env[0].name" in refused["message"]
        assert await cluster.children("clash") == {"configmaps": [], "services": [], "jobs": []}

        # Alert: Degraded with the rule and its evidence, a Warning Event, the metric; runs on
        alert = await wait_condition(cluster, "collapse-alert", c.COND_DEGRADED, "True", 240)
        degraded = condition(alert, c.COND_DEGRADED)
        assert degraded["reason"] == c.RULE_LORA_GRADIENT_COLLAPSE, degraded
        assert "||grad B||/||grad A||" in degraded["message"], degraded  # the evidence
        health = alert["status"]["health"]
        assert health["verdict"] == c.VERDICT_DEGRADED
        assert health["rulesFiring"][0]["rule"] == c.RULE_LORA_GRADIENT_COLLAPSE
        assert health["rulesFiring"][0]["evidence"], health
        assert alert["status"]["phase"] == c.PHASE_RUNNING
        warnings = await until(lambda: collapse_warnings(cluster), timeout=15)  # posted async
        assert len(warnings) == 1, warnings
        snapshot = cluster.metrics.snapshot()
        assert snapshot[(NS, "collapse-alert")][1] == c.RULE_LORA_GRADIENT_COLLAPSE
        described = await cluster.kubectl("describe", "lft", "collapse-alert")
        assert "Warning" in described and c.RULE_LORA_GRADIENT_COLLAPSE in described

        # operator restart while Degraded: same children, condition time kept, no new Event
        kids = await cluster.children("collapse-alert")
        await cluster.stop_operator()
        await cluster.start_operator()
        await asyncio.sleep(3 * cluster.config.health_interval_seconds)
        again = await cluster.lft("collapse-alert")
        kept = condition(again, c.COND_DEGRADED)
        assert (kept["status"], kept["lastTransitionTime"]) == (
            "True",
            degraded["lastTransitionTime"],
        )
        assert await cluster.children("collapse-alert") == kids or all(
            len(v) == len(kids[k]) for k, v in (await cluster.children("collapse-alert")).items()
        )
        warnings = await collapse_warnings(cluster)
        assert len(warnings) == 1, warnings
        await cluster.kubectl("delete", "lft", "collapse-alert", "--wait=false")

        # Suspend (the example): Degraded, then Suspended by the health policy, pods gone
        demo = await wait_phase(cluster, "collapse-demo", c.PHASE_SUSPENDED, timeout=240)
        assert condition(demo, c.COND_DEGRADED)["reason"] == c.RULE_LORA_GRADIENT_COLLAPSE
        suspended = condition(demo, c.COND_SUSPENDED)
        assert suspended["reason"] == c.REASON_HEALTH_POLICY, suspended
        assert demo["spec"]["runPolicy"]["suspend"] is True
        assert (
            c.RULE_LORA_GRADIENT_COLLAPSE
            in demo["metadata"]["annotations"][ANNOTATION_HEALTH_SUSPEND]
        )
        assert condition(demo, c.COND_PREFLIGHT_PASSED)["status"] == "True"

        async def no_pods() -> bool:
            return not await trainer_pods(cluster, "collapse-demo")

        await until(no_pods, timeout=60)
        step = demo["status"]["progress"]["step"]
        assert step < 200, "suspended before wasting its budget"

        # Fail: the trainer stops itself (exit 86), the job ends Failed, never retried
        failed = await wait_phase(cluster, "collapse-fail", c.PHASE_FAILED, timeout=240)
        assert condition(failed, c.COND_FAILED)["reason"] == c.REASON_HEALTH_POLICY
        assert not failed["status"].get("restarts")
        await asyncio.sleep(2 * cluster.config.health_interval_seconds)
        assert len(await trainer_pods(cluster, "collapse-fail")) <= 1


async def test_unreachable_health_then_a_killed_pod(tiny_assets: Any, tmp_path: Path) -> None:
    """The trainer stops answering (SIGSTOP) mid-run: health Unknown, never Degraded. It
    continues (SIGCONT); then its pod is killed (SIGKILL): the whole gang restarts once and
    resumes from the last checkpoint, and the job succeeds."""
    tiny = Path(tiny_assets.model_dir).parent
    out = tmp_path / "run"
    patch = {
        "training": {"maxSteps": 300, "checkpointEverySteps": 20},
        "health": {"preflight": {"enabled": False}},
    }
    async with local_cluster(tmp_path) as cluster:
        manifest = quickstart(tiny, out, patch)
        await cluster.kubectl("apply", "--validate=false", "-f", "-", stdin=manifest)

        async def reading() -> Any:
            lft = await cluster.lft("quickstart")
            return lft if "progress" in (lft.get("status") or {}) else None

        await until(reading, timeout=120)
        (pod,) = await trainer_pods(cluster, "quickstart")
        name = pod["metadata"]["name"]
        assert cluster.runner.signal_pod(NS, name, signal.SIGSTOP) >= 3  # launcher, agent, rank
        try:

            async def unknown() -> Any:
                lft = await cluster.lft("quickstart")
                health = lft["status"]["health"]
                return lft if "cannot read" in (health.get("message") or "") else None

            lft = await until(unknown, timeout=30)
            assert lft["status"]["health"]["verdict"] == c.VERDICT_UNKNOWN
            assert "timeout" in lft["status"]["health"]["message"]
            assert condition(lft, c.COND_DEGRADED)["status"] != "True"
        finally:
            cluster.runner.signal_pod(NS, name, signal.SIGCONT)
        text = cluster.metrics.render().decode()
        assert 'lora_operator_health_read_errors_total{kind="timeout"} 0.0' not in text, text

        async def past_checkpoint() -> Any:
            lft = await cluster.lft("quickstart")
            return lft if lft["status"]["progress"]["step"] >= 25 else None

        await until(past_checkpoint, timeout=120)
        cluster.runner.signal_pod(NS, name, signal.SIGKILL)  # the pod fails: infrastructure
        done = await wait_phase(cluster, "quickstart", c.PHASE_SUCCEEDED, timeout=300)
        assert done["status"]["restarts"] == 1
        restarting = [
            e for e in await events_of(cluster, "quickstart") if e["reason"] == "Restarting"
        ]
        assert len(restarting) == 1 and "restart 1 of" in restarting[0]["message"], restarting
        assert condition(done, c.COND_DEGRADED)["status"] == "False"
        kids = await cluster.children("quickstart")
        assert (
            len(kids["jobs"]) == 1
            and kids["jobs"][0]["metadata"]["uid"] != pod["metadata"]["ownerReferences"][0]["uid"]
        )
        steps = [
            json.loads(line)["step"]
            for line in (out / "trace.jsonl").read_text().splitlines()
            if '"loss"' in line
        ]
        resumed = [b for a, b in zip(steps, steps[1:], strict=False) if b <= a]
        assert len(resumed) == 1, "one resume"
        assert resumed[0] - 1 >= 20 and (resumed[0] - 1) % 20 == 0, steps  # from a checkpoint
        assert steps[-1] == 300
