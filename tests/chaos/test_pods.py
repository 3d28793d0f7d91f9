"""The pod runner's faults on training pods (chaos_full: each needs a run long enough to
checkpoint, kill and resume).

- a trainer pod SIGKILLed mid-run: the gang restarts within backoffLimit, resumes from its
  last checkpoint (steps lost <= checkpoint interval), and its final eval loss is within
  tolerance of an undisturbed run of the same spec, run side by side;
- node-rank 1 of a 2-node job killed: the whole gang restarts (a new Job whose two pods both
  start; never one pod of a Job alone), restarts == 1;
- a suspended job (longer than stallTimeoutSeconds): no Stalled, no Degraded; resumed, it
  continues from its checkpoint and succeeds.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from lora_operator.api import constants as c
from tests.chaos.faults import (
    DONE,
    MARKS,
    duplicates,
    elapsed,
    job_body,
    pods_of,
    record,
    report,
    status_errors,
    steps_lost,
    train_steps,
    wait_phase,
)
from tests.e2e.cluster import LFTS, condition, local_cluster, until

pytestmark = [*MARKS, pytest.mark.chaos_full]
CKPT = 20


async def step_at_least(cluster: Any, name: str, step: int, timeout: float = 240) -> Any:
    async def check() -> Any:
        lft = await cluster.lft(name)
        prog = (lft.get("status") or {}).get("progress") or {}
        return lft if (prog.get("step") or 0) >= step else None

    return await until(check, timeout=timeout)


async def step_or_end(cluster: Any, name: str, step: int, timeout: float) -> Any:
    """The object once its progress reaches STEP or it ended."""

    async def check() -> Any:
        lft = await cluster.lft(name)
        st = lft.get("status") or {}
        return lft if (st.get("progress") or {}).get("step", 0) >= step or st.get(
            "phase") in DONE else None  # fmt: skip

    return await until(check, timeout=timeout)


def restart_dups(found: list[str], restarts: int) -> list[str]:
    """Duplicates beyond what RESTARTS new training Jobs legitimately bring: one more Job
    run, its `Created` Event and the `Running` transition Event each once more."""
    n = restarts + 1
    legit = (f"{n} training Jobs ran", f"event Created x{n} (created Job ", f"event Running x{n} (")
    return [d for d in found if not d.startswith(legit)]


def final_eval_loss(trace: Path) -> float | None:
    losses = [
        json.loads(line)["eval_loss"]
        for line in trace.read_text().splitlines()
        if '"eval_loss"' in line
    ]
    return losses[-1] if losses else None


async def test_trainer_killed_resumes_and_matches_undisturbed(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    patch = {
        "training": {"maxSteps": 60, "checkpointEverySteps": CKPT,
                     "eval": {"metrics": ["loss"], "everySteps": 30}},
        "runPolicy": {"backoffLimit": 2},
    }  # fmt: skip
    start = time.monotonic()
    async with local_cluster(tmp_path) as cluster:
        for name in ("undisturbed", "killed"):
            await cluster.apply(job_body(tiny, out / name, name, patch))
        # the job's own trace, not its status: two trainers side by side on the local runner
        # may read each other's /health (see docs/reliability.md, Known gaps)
        trace = out / "killed" / "trace.jsonl"

        async def past_checkpoint() -> bool:
            return max(train_steps(trace), default=0) >= CKPT + 5

        await until(past_checkpoint, timeout=300)
        (pod,) = await pods_of(cluster, "killed")
        killed_at = max(train_steps(trace))
        cluster.runner.signal_pod("default", pod["metadata"]["name"], signal.SIGKILL)
        done = await wait_phase(cluster, "killed", DONE, timeout=400)
        ref = await wait_phase(cluster, "undisturbed", DONE, timeout=400)
        errs = status_errors(done, c.PHASE_SUCCEEDED, 1, 60)
        errs += status_errors(ref, c.PHASE_SUCCEEDED, 0, 60)
        dups = restart_dups(await duplicates(cluster, "killed", False), restarts=1)
    steps = train_steps(out / "killed" / "trace.jsonl")
    lost = steps_lost(steps)
    if lost > CKPT:
        errs.append(f"{lost} steps lost > checkpoint interval {CKPT}")
    a = final_eval_loss(out / "killed" / "trace.jsonl")
    b = final_eval_loss(out / "undisturbed" / "trace.jsonl")
    tol = 0.05 * abs(b or 1.0) + 0.02
    if a is None or b is None or abs(a - b) > tol:
        errs.append(f"final eval loss {a} vs undisturbed {b} (tolerance {tol:.3f})")
    row = report("trainer pod SIGKILL mid-run (vs undisturbed)", "pods", start, errs, dups,
                 jobs=2, lost=lost, killed_at=killed_at, eval_loss=[a, b])  # fmt: skip
    assert not errs and not dups, row


async def test_node_rank_1_killed_restarts_whole_gang(tiny: Path, tmp_path: Path) -> None:
    patch = {
        "dataset": {"source": "pvc://data/train.jsonl", "evalSource": "pvc://data/eval.jsonl"},
        "distributed": {"nodes": 2},
        "training": {"maxSteps": 40, "checkpointEverySteps": CKPT,
                     "eval": {"metrics": ["loss"], "everySteps": 100}},
        "runPolicy": {"backoffLimit": 2},
        "output": {"uri": "pvc://out/gang"},
    }  # fmt: skip
    start = time.monotonic()
    async with local_cluster(tmp_path) as cluster:
        pvcs = tmp_path / "state" / "runner" / "pvcs" / "default"
        (pvcs / "data").mkdir(parents=True, exist_ok=True)
        for f in ("train.jsonl", "eval.jsonl"):
            shutil.copy(tiny / "data" / f, pvcs / "data" / f)
        gang: dict[str, set[str]] = {}  # training Job uid -> pods seen running

        async def watch_pods() -> None:
            while True:
                for p in await pods_of(cluster, "gang"):
                    if (p.get("status") or {}).get("phase") == "Running":
                        uid = p["metadata"]["ownerReferences"][0]["uid"]
                        gang.setdefault(uid, set()).add(p["metadata"]["name"])
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch_pods())
        await cluster.apply(job_body(tiny, tmp_path / "gang", "gang", patch))
        lft = await step_or_end(cluster, "gang", CKPT + 5, timeout=400)
        if (lft["status"].get("phase")) in DONE:
            record({"fault": "2-node job: node-rank 1 SIGKILL", "suite": "pods", "jobs": 1,
                    "status_errors": 1, "seconds": elapsed(start), "outcome": "FAIL",
                    "details": [f"phase {lft['status']['phase']} before any step",
                                f"training Jobs run: {len(gang)}, pods per Job: "
                                f"{sorted(len(p) for p in gang.values())}"]})  # fmt: skip
            raise AssertionError(f"never trained: {lft['status'].get('conditions')}")
        pods = await pods_of(cluster, "gang")
        rank1 = next(
            p for p in pods
            if p["metadata"]["annotations"].get("batch.kubernetes.io/job-completion-index") == "1"
        )  # fmt: skip
        first_uid = rank1["metadata"]["ownerReferences"][0]["uid"]
        cluster.runner.signal_pod("default", rank1["metadata"]["name"], signal.SIGKILL)
        done = await wait_phase(cluster, "gang", DONE, timeout=500)
        await asyncio.sleep(1)
        watcher.cancel()
        errs = status_errors(done, c.PHASE_SUCCEEDED, 1, 40)
        kids = await cluster.children("gang")
    new = [u for u in gang if u != first_uid]
    if len(new) != 1:
        errs.append(f"{len(new)} new training Jobs (want 1): {gang}")
    half = {u: sorted(p) for u, p in gang.items() if len(p) != 2}
    if half:
        errs.append(f"a Job ran with other than 2 pods: {half}")
    trace = tmp_path / "state" / "runner" / "pvcs" / "default" / "out" / "gang" / "trace.jsonl"
    lost = steps_lost(train_steps(trace))
    if lost > CKPT:
        errs.append(f"{lost} steps lost > {CKPT}")
    # a training Job left over at the end is counted, not failed: the checks above decide
    row = report("2-node job: node-rank 1 SIGKILL", "pods", start, errs, [], lost=lost,
                 duplicates=max(0, len(kids["jobs"]) - 1))  # fmt: skip
    assert not errs, row


async def test_suspended_job_pauses_clocks_and_resumes(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    stall = 60
    patch = {
        "training": {"maxSteps": 150, "checkpointEverySteps": CKPT},
        "health": {"stallTimeoutSeconds": stall},
    }
    start = time.monotonic()
    errs: list[str] = []
    async with local_cluster(tmp_path) as cluster:
        await cluster.apply(job_body(tiny, out / "pause", "pause", patch))
        trace = out / "pause" / "trace.jsonl"

        async def past_checkpoint() -> bool:
            return max(train_steps(trace), default=0) >= CKPT + 5

        await until(past_checkpoint, timeout=300)
        url = f"{LFTS}/pause"
        await cluster.client.patch(url, {"spec": {"runPolicy": {"suspend": True}}})
        await wait_phase(cluster, "pause", (c.PHASE_SUSPENDED,), timeout=120)
        paused_at = time.monotonic()
        while time.monotonic() - paused_at < stall + 15:
            lft = await cluster.lft("pause")
            deg = condition(lft, c.COND_DEGRADED)
            fired = [r.get("rule") for r in (lft["status"].get("health") or {}).get(
                "rulesFiring") or []]  # fmt: skip
            if (deg and deg["status"] == "True") or c.RULE_STALLED in fired:
                errs.append(f"while suspended: Degraded {deg} rules {fired}")
                break
            await asyncio.sleep(1)
        await cluster.client.patch(url, {"spec": {"runPolicy": {"suspend": False}}})
        await asyncio.sleep(3 * cluster.config.health_interval_seconds)
        lft = await cluster.lft("pause")
        deg = condition(lft, c.COND_DEGRADED)
        if deg and deg["status"] == "True":
            errs.append(f"after resume: Degraded {deg.get('reason')}")
        done = await wait_phase(cluster, "pause", DONE, timeout=400)
        errs += status_errors(done, c.PHASE_SUCCEEDED, 0, 150)
        dups = restart_dups(await duplicates(cluster, "pause", False), restarts=1)
    steps = train_steps(out / "pause" / "trace.jsonl")
    lost = steps_lost(steps)
    # suspension SIGTERMs the trainer, which checkpoints at the end of its step: the resumed
    # pod must log that it resumes from a checkpoint, and redo at most CKPT steps
    logs = sorted((tmp_path / "state" / "runner" / "pods" / "default").glob("pause-*/trainer.log"))
    resumed = [ln for log in logs for ln in log.read_text().splitlines() if "resuming from" in ln]
    if len(logs) != 2 or len(resumed) != 1 or "checkpoint-" not in resumed[0] or lost > CKPT:
        errs.append(f"resume not from a checkpoint: pods {len(logs)}, {resumed}, lost {lost}")
    row = report(f"suspended {stall + 15} s > stallTimeout {stall} s, resumed", "pods", start,
                 errs, dups, lost=lost)  # fmt: skip
    assert not errs and not dups, row
