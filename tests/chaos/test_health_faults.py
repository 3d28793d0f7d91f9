"""/health down or answering garbage while a job trains: health Unknown, never Degraded, the
operator keeps running, the job ends Succeeded. The operator's reader (handlers.read_health)
is replaced for a while by one that answers each kind of failure in turn: refused, HTTP 500,
a timeout, non-JSON, a JSON list, an object of the wrong shape, an empty object."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from lora_operator.api import constants as c
from lora_operator.controller import handlers
from lora_operator.controller.health_watch import Probe
from tests.chaos.faults import (
    DONE,
    MARKS,
    duplicates,
    job_body,
    pods_of,
    report,
    status_errors,
    steps_lost,
    train_steps,
    wait_phase,
)
from tests.e2e.cluster import condition, local_cluster, until

pytestmark = MARKS
MAX_STEPS = 300  # the trainer is frozen (SIGSTOP) while 8 garbage answers are served
GARBAGE = [
    Probe(error="unreachable", detail="connection refused"),
    Probe(error="http_status", detail="HTTP 500 from /health"),
    Probe(error="timeout", detail="no answer within 2 s"),
    Probe(error="malformed", detail="/health: not JSON"),
    Probe(error="malformed", detail="/health: not a JSON object"),
    Probe(body={"verdict": 42, "rulesFiring": "all of them", "metrics": [1, 2]}),
    Probe(body={}),
    Probe(body={"verdict": "Degraded"}),  # claims Degraded without a rule or evidence
]


async def test_health_down_or_garbage(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    patch = {"training": {"maxSteps": MAX_STEPS, "checkpointEverySteps": 100}}
    real = handlers.read_health
    answers = itertools.cycle(GARBAGE)
    armed = [False]
    served: list[Probe] = []

    def faulty(endpoint: str, timeout: float) -> Probe:
        if not armed[0]:
            return real(endpoint, timeout)
        probe = next(answers)
        served.append(probe)
        return probe

    monkeypatch.setattr(handlers, "read_health", faulty)
    start = time.monotonic()
    errs: list[str] = []
    async with local_cluster(tmp_path) as cluster:
        await cluster.apply(job_body(tiny, out, patch=patch))

        async def reading() -> Any:
            lft = await cluster.lft("quickstart")
            return lft if "progress" in (lft.get("status") or {}) else None

        await until(reading, timeout=120)
        # the trainer frozen while the garbage is served: all of it falls mid-job however
        # fast the machine trains and however late the health ticks come
        (pod,) = await pods_of(cluster, "quickstart")
        cluster.runner.signal_pod("default", pod["metadata"]["name"], signal.SIGSTOP)
        armed[0] = True
        verdicts = set()
        deadline = time.monotonic() + 6 * len(GARBAGE) * cluster.config.health_interval_seconds
        while time.monotonic() < deadline and len(served) < len(GARBAGE) + 1:
            lft = await cluster.lft("quickstart")
            if lft["status"].get("phase") in DONE:
                break
            health = lft["status"].get("health") or {}
            verdicts.add(health.get("verdict"))
            deg = condition(lft, c.COND_DEGRADED)
            if deg is not None and deg["status"] == "True":
                errs.append(f"Degraded under garbage: {deg.get('reason')} {deg.get('message')}")
                break
            await until(lambda: _sleep(0.5), timeout=2)
        armed[0] = False
        cluster.runner.signal_pod("default", pod["metadata"]["name"], signal.SIGCONT)
        alive = cluster.operator_running
        if len(served) < len(GARBAGE):
            errs.append(f"only {len(served)} garbage answers served (health ticks too slow)")
        if c.VERDICT_UNKNOWN not in verdicts:
            errs.append(f"verdict never Unknown: {verdicts}")
        lft = await wait_phase(cluster, "quickstart", DONE, 480)
        errs += status_errors(lft, c.PHASE_SUCCEEDED, 0, MAX_STEPS)
        dups = await duplicates(cluster, "quickstart", False)
        lost = steps_lost(train_steps(out / "trace.jsonl"))
    row = report("/health down or garbage (8 kinds)", "health", start, errs, dups, lost=lost,
                 alive=alive, served=len(served))  # fmt: skip
    assert alive, "the operator died"
    assert not errs and not dups, row


async def _sleep(seconds: float) -> bool:
    await asyncio.sleep(seconds)
    return True
