"""API faults at random points during full jobs (409s, 500s, slow answers, timeouts, dropped
watches on the operator's own requests; the pod runner's are left alone): each job still ends
in the right phase, with one set of children and no duplicate Event. Plus TTL: a finished
job is deleted once and never recreated, also under faults."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_operator.api import constants as c
from lora_operator.controller.reconcile import TERMINAL_PHASES
from tests.chaos.faults import (
    api_faults,
    duplicates,
    elapsed,
    lft_or_none,
    record,
    status_errors,
    steps_lost,
    train_steps,
    wait_phase,
)
from tests.e2e.cluster import LFTS, local_cluster, quickstart, until

pytestmark = [pytest.mark.slow, pytest.mark.training]
MAX_STEPS = 10


def job(tiny: Path, out: Path, name: str, patch: dict[str, Any] | None = None) -> dict[str, Any]:
    base = {
        "training": {"maxSteps": MAX_STEPS, "checkpointEverySteps": 5},
        "health": {"preflight": {"enabled": False}},
    }
    body: dict[str, Any] = yaml.safe_load(quickstart(tiny, out / name, base))
    body["metadata"]["name"] = name
    if patch:
        from tests.conftest import deep_merge

        body = deep_merge(body, {"spec": patch})
    return body


@pytest.mark.parametrize(
    ("seed", "count"),
    [(1, 10), *(pytest.param(s, 25, marks=pytest.mark.chaos_full) for s in (2, 3, 4))],
)
async def test_random_api_faults_during_jobs(
    tiny_assets: Any, tmp_path: Path, seed: int, count: int
) -> None:
    tiny = Path(tiny_assets.model_dir).parent
    out = tmp_path / "runs"
    names = ["chaos-a", "chaos-b"]
    start = time.monotonic()
    async with local_cluster(tmp_path) as cluster:
        faults = api_faults(cluster, seed, count)
        for name in names:
            await cluster.apply(job(tiny, out, name))
        dups: list[str] = []
        errs: list[str] = []
        lost = 0
        for name in names:
            try:
                lft = await wait_phase(cluster, name, tuple(TERMINAL_PHASES), timeout=300)
            except AssertionError:
                lft = await cluster.lft(name)
                errs.append(f"{name}: not finished (operator alive: {cluster.operator_running})")
            dups += [f"{name}: {d}" for d in await duplicates(cluster, name, False)]
            errs += [f"{name}: {e}" for e in status_errors(lft, c.PHASE_SUCCEEDED, 0, MAX_STEPS)]
            lost += steps_lost(train_steps(out / name / "trace.jsonl"))
        hit = sum(1 for f in faults if f.times <= 0)
        alive = cluster.operator_running
    row = {"fault": f"random API faults (seed {seed}, {hit}/{count} hit)", "suite": "api",
           "jobs": len(names), "duplicates": len(dups), "status_errors": len(errs),
           "steps_lost": lost, "faults_hit": hit, "seconds": elapsed(start),
           "outcome": "pass" if not dups and not errs and alive else "FAIL",
           "details": dups + errs}  # fmt: skip
    record(row)
    assert alive, "the operator died"
    assert row["outcome"] == "pass", row


@pytest.mark.parametrize("faulty", [False, pytest.param(True, marks=pytest.mark.chaos_full)])
async def test_ttl_deletes_once_never_recreates(
    tiny_assets: Any, tmp_path: Path, faulty: bool
) -> None:
    tiny = Path(tiny_assets.model_dir).parent
    start = time.monotonic()
    async with local_cluster(tmp_path) as cluster:
        if faulty:
            api_faults(cluster, 7, 15)
        body = job(tiny, tmp_path / "runs", "ttl", {"runPolicy": {"ttlSecondsAfterFinished": 2}})
        seen: list[str] = []

        async def watch() -> None:  # the LoRAFineTune's watch events, from before its creation
            async for ev in cluster.client.watch(LFTS, timeout=600):
                if (ev.get("object") or {}).get("metadata", {}).get("name") == "ttl":
                    seen.append(ev["type"])

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.5)
        await cluster.apply(body)

        async def gone() -> bool:
            return await lft_or_none(cluster, "ttl") is None

        await until(gone, timeout=240)
        # a few health ticks and a restarted operator later it is still gone
        await cluster.stop_operator()
        await cluster.start_operator()
        await asyncio.sleep(3 * cluster.config.health_interval_seconds)
        still_gone = await gone()
        watcher.cancel()
        deletes = [t for t in seen if t == "DELETED"]
        creates = [t for t in seen if t == "ADDED"]
        kids = await cluster.children("ttl")
        trainers = steps_lost(train_steps(tmp_path / "runs" / "ttl" / "trace.jsonl"))
    errs = [] if still_gone else ["recreated"]
    dup = max(0, len(deletes) - 1) + max(0, len(creates) - 1)
    row = {"fault": "TTL 2 s" + (" + API faults" if faulty else ""), "suite": "ttl", "jobs": 1,
           "duplicates": dup, "status_errors": len(errs), "steps_lost": trainers,
           "seconds": elapsed(start), "deletes": len(deletes),
           "children_left": {k: len(v) for k, v in kids.items()},
           "outcome": "pass" if not dup and not errs else "FAIL"}  # fmt: skip
    record(row)
    assert still_gone and len(creates) == 1, row
    assert len(deletes) == 1, row
