"""The operator killed at every distinct point of a job's reconciles (between two API writes):
after a fresh operator starts, exactly one set of children and the right final status.

An undisturbed run counts the operator's writes (status patches, creates, Job patches and
deletes through `Kube`); then each point runs the same job on a fresh local cluster where
the n-th write kills the operator (before or after it reaches the API; nothing after it goes
out), a new operator starts, and the job must end Succeeded with one ConfigMap, one Service,
one training Job (plus the pre-flight Job when on), restarts 0, no duplicate Event.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from lora_operator.api import constants as c
from tests.chaos.faults import (
    DONE,
    MARKS,
    WriteCrash,
    duplicates,
    job_body,
    report,
    status_errors,
    steps_lost,
    train_steps,
    wait_phase,
)
from tests.e2e.cluster import local_cluster, until

pytestmark = MARKS
MAX_STEPS = 6
# Undisturbed runs (test_undisturbed_write_count) write, preflight off: status Pending,
# ConfigMap, Service, Job, status Starting x2, then status Running once per health tick with
# progress, then status Succeeded (14 writes in all on 2 cores); preflight on: status, ConfigMap,
# Service, pre-flight Job, status, training Job, status Starting x2, Running..., Succeeded (24).
# The distinct points: after each write up to the first Running one, and around the final
# status write (the Running ones differ only in progress).
WRITES_NO_PREFLIGHT = 7
WRITES_PREFLIGHT = 9
FINAL = "patch_status Succeeded"


async def run_job(
    tmp_path: Path, tiny: Path, monkeypatch: Any, preflight: bool,
    crash_at: tuple[str, int | str] | None,
) -> tuple[WriteCrash, dict[str, Any]]:  # fmt: skip
    out = tmp_path / "run"
    crash = WriteCrash(crash_at)
    crash.install(monkeypatch)
    start = time.monotonic()
    async with local_cluster(tmp_path) as cluster:
        crash.stop = cluster.stop.set  # the operator's thread stops at the crash point
        patch = {
            "training": {"maxSteps": MAX_STEPS, "checkpointEverySteps": 3,
                         "eval": {"metrics": ["loss"], "everySteps": 100}},
            "health": {"preflight": {"enabled": preflight}},
        }  # fmt: skip
        await cluster.apply(job_body(tiny, out, patch=patch))
        crashed = False
        if crash_at is not None:

            async def dead() -> bool:
                return crash.crashed.is_set()

            try:
                await until(dead, timeout=180)
                crashed = True
            except AssertionError:
                pass  # the job finished before the n-th write: a plain run
            await cluster.stop_operator()
            crash.disarm()
            await cluster.start_operator()
        lft = await wait_phase(cluster, "quickstart", DONE, timeout=240)
        dups = await duplicates(cluster, "quickstart", preflight)
        errs = status_errors(lft, c.PHASE_SUCCEEDED, 0, MAX_STEPS)
        lost = steps_lost(train_steps(out / "trace.jsonl"))
    mode, n = crash_at or ("none", 0)
    what = f"operator killed {mode} write {n}" if crash_at else "undisturbed (writes counted)"
    row = report(what + (" (preflight)" if preflight else ""), "crash", start, errs, dups,
                 lost=lost, crashed=crashed, writes=crash.writes)  # fmt: skip
    return crash, row


@pytest.mark.parametrize(
    "preflight",
    [False, True],
    ids=["plain", "preflight"],
)
@pytest.mark.chaos_full
async def test_undisturbed_write_count(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preflight: bool
) -> None:
    crash, row = await run_job(tmp_path, tiny, monkeypatch, preflight, None)
    assert row["outcome"] == "pass", row
    assert len(crash.writes) >= 4, crash.writes  # status, ConfigMap, Service, Job at least


POINTS: list[tuple[str, int | str]] = [
    ("before", 1),
    *(("after", n) for n in range(1, WRITES_NO_PREFLIGHT + 1)),
    ("before", FINAL),
    ("after", FINAL),
]
CI_POINTS = {("after", 1), ("after", 3), ("after", 4)}  # status, Service, training Job


@pytest.mark.parametrize(
    "point",
    [p if p in CI_POINTS else pytest.param(p, marks=pytest.mark.chaos_full) for p in POINTS],
    ids=lambda p: f"{p[0]}-{p[1]}".replace(" ", "-"),
)
async def test_killed_between_writes(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: tuple[str, int | str]
) -> None:
    crash, row = await run_job(tmp_path, tiny, monkeypatch, False, point)
    assert row["outcome"] == "pass", row


@pytest.mark.chaos_full
@pytest.mark.parametrize("n", [*range(1, WRITES_PREFLIGHT + 1), FINAL])
async def test_killed_between_writes_with_preflight(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int | str
) -> None:
    crash, row = await run_job(tmp_path, tiny, monkeypatch, True, ("after", n))
    assert row["outcome"] == "pass", row
