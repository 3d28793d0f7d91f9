"""Fault-injection helpers for the chaos suites: the operator killed between two API writes,
API faults on the operator's own requests, result rows for `bench/chaos_table.py`; and what
every suite shares: its markers (`pytestmark = MARKS`), the job it runs (`job_body`, the
quickstart on the tiny assets; the `tiny` fixture is in conftest.py), the local cluster
(tests.e2e.cluster.local_cluster: 2 s health ticks, 5 s watches).

A row per test goes to the JSON-lines file named by $LORA_CHAOS_RESULTS (nothing is written
when it is unset): fault, jobs run, duplicates found, status errors, steps lost, outcome.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_operator.api import constants as c
from lora_operator.controller.kube import Kube
from lora_operator.controller.reconcile import TERMINAL_PHASES
from lora_operator.local.apiserver import Fault, LoggedRequest
from tests.conftest import deep_merge
from tests.e2e.cluster import NS, PODS, Cluster, condition, quickstart, until

MARKS = [pytest.mark.slow, pytest.mark.training]  # every chaos test trains on the local cluster
DONE = tuple(TERMINAL_PHASES)
PREFLIGHT_OFF = {"health": {"preflight": {"enabled": False}}}

EVENTS = f"/api/v1/namespaces/{NS}/events"
WRITES = ("patch_status", "patch_lorafinetune", "delete", "create", "patch_job")
LOCAL_AGENT = "lora-operator-local"
WRITE_VERBS = ("create", "update", "patch", "delete")
READ_VERBS = ("get", "list", "watch")  # discovery GETs are logged as "get" with no resource


def job_body(
    tiny: Path, out: Path, name: str = "quickstart", patch: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The quickstart on the tiny assets as NAME, writing to OUT, pre-flight off unless PATCH
    (merged into the spec) turns it on."""
    spec = deep_merge(PREFLIGHT_OFF, patch or {})
    body: dict[str, Any] = yaml.safe_load(quickstart(tiny, out, spec))
    body["metadata"]["name"] = name
    return body


def report(
    fault: str, suite: str, start: float, errs: list[str], dups: list[str], *,
    jobs: int = 1, lost: int = 0, alive: bool = True, **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    """Record the test's row (EXTRA: more fields, or overrides) and return it: it passes when
    the operator is alive with no status error and no duplicate."""
    row = {"fault": fault, "suite": suite, "jobs": jobs, "duplicates": len(dups),
           "status_errors": len(errs), "steps_lost": lost, "seconds": elapsed(start),
           "outcome": "pass" if alive and not errs and not dups else "FAIL",
           "details": errs + dups, **extra}  # fmt: skip
    record(row)
    return row


def record(row: dict[str, Any]) -> None:
    """Append one result row to $LORA_CHAOS_RESULTS (when set)."""
    path = os.environ.get("LORA_CHAOS_RESULTS")
    if not path:
        return
    row = {"fault": "", "jobs": 0, "duplicates": 0, "status_errors": 0, "steps_lost": 0,
           "outcome": "pass", **row}  # fmt: skip
    with Path(path).open("a") as f:
        f.write(json.dumps(row) + "\n")


class OperatorCrash(Exception):  # noqa: N818 (a simulated process death, not an error)
    """Raised inside the operator where it is 'killed': no later write goes out."""


@dataclass
class WriteCrash:
    """Counts the operator's API writes (Kube's write methods); with CRASH_AT=(mode, n), the
    n-th write raises OperatorCrash before ('before') or after ('after') reaching the API and
    every later write raises too, and STOP is set: the operator dies right there."""

    crash_at: tuple[str, int | str] | None = None  # (mode, n-th write or first with label)
    stop: Callable[[], None] | None = None
    writes: list[str] = field(default_factory=list)
    crashed: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, monkeypatch: Any) -> None:
        for name in WRITES:
            monkeypatch.setattr(Kube, name, self._wrap(name, getattr(Kube, name)))

    def disarm(self) -> None:
        """The restarted operator writes freely (the crash point is spent)."""
        self.crash_at = None
        self.crashed.clear()

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def write(kube: Kube, *args: Any) -> Any:
            with self._lock:
                if self.crashed.is_set():
                    raise OperatorCrash(f"operator is dead (before {name})")
                label = _label(name, args)
                self.writes.append(label)
                n = len(self.writes)
                hit = self.crash_at is not None and self.crash_at[1] in (n, label)
                mode = self.crash_at[0] if self.crash_at else ""
                if hit and mode == "before":
                    self.writes.pop()
                    self._die()
                    raise OperatorCrash(f"killed before write {n} ({name})")
            result = real(kube, *args)
            if hit:
                with self._lock:
                    self._die()
                raise OperatorCrash(f"killed after write {n} ({name})")
            return result

        return write

    def _die(self) -> None:
        self.crashed.set()
        if self.stop is not None:
            self.stop()


def _label(name: str, args: tuple[Any, ...]) -> str:
    if name == "create":
        return f"create {args[0]['kind']}/{args[0]['metadata']['name']}"
    if name == "patch_status":
        return f"patch_status {args[2].get('phase')}"
    if name == "delete":
        return f"delete {args[1]}/{args[3]}"
    return name


def api_faults(
    cluster: Cluster,
    seed: int,
    count: int,
    kinds: tuple[str, ...] = ("409", "500", "slow", "timeout", "drop"),
) -> list[Fault]:
    """COUNT faults on the operator's own requests (never the pod runner's), each armed on a
    random later request of a random kind; returns them (their `times` drops to 0 once hit)."""
    rng = random.Random(seed)
    faults = []
    for _ in range(count):
        kind = rng.choice(kinds)
        skip = rng.randint(0, 40)
        faults.append(cluster.api.inject(_fault(kind, skip, rng)))
    return faults


def _fault(kind: str, skip: int, rng: random.Random) -> Fault:
    left = [skip]

    def match(entry: LoggedRequest, watch: bool = kind == "drop") -> bool:
        if entry.user_agent.startswith(LOCAL_AGENT) or (entry.verb == "watch") != watch:
            return False
        if kind == "409" and entry.verb not in WRITE_VERBS:
            return False  # an API server answers 409 only to writes
        left[0] -= 1
        return left[0] < 0

    if kind == "409":
        return Fault(match, status=409)
    if kind == "500":
        return Fault(match, times=rng.randint(1, 3), status=500)
    if kind == "slow":
        return Fault(match, times=rng.randint(1, 5), delay=rng.uniform(0.5, 2.0))
    if kind == "timeout":  # longer than a client would wait, then a 504
        return Fault(match, delay=rng.uniform(5.0, 8.0), status=504)
    return Fault(match, drop_watch=True)


@dataclass
class ReadOutage:
    """While open, every read of the operator (kopf's and its own client's: discovery GETs,
    get, list, watch; never the pod runner's or the tests') is answered 500 and 503 in turn,
    as an API server whose etcd or aggregation layer is briefly down does; `hits` logs them.
    With `opens_on` set to a kind (see `kinds`), it opens at the operator's next such read."""

    is_open: bool = False
    opens_on: str = ""
    hits: list[LoggedRequest] = field(default_factory=list)

    def install(self, cluster: Cluster) -> ReadOutage:
        for status in (500, 503):
            cluster.api.inject(Fault(self._match(status), times=1 << 30, status=status))
        return self

    def _match(self, status: int) -> Callable[[LoggedRequest], bool]:
        def match(entry: LoggedRequest) -> bool:
            if entry.user_agent.startswith(LOCAL_AGENT):
                return False
            if self.opens_on and _kind(entry) == self.opens_on:
                self.is_open, self.opens_on = True, ""
            if not self.is_open:
                return False
            if entry.verb not in READ_VERBS or (status == 500 and len(self.hits) % 2):
                return False  # every other read falls through to the 503 fault
            self.hits.append(entry)
            return True

        return match

    def kinds(self) -> dict[str, int]:
        """Requests answered 5xx per kind: 'discovery' or '<verb> <resource>'."""
        out: dict[str, int] = {}
        for e in self.hits:
            out[_kind(e)] = out.get(_kind(e), 0) + 1
        return out


def _kind(entry: LoggedRequest) -> str:
    return f"{entry.verb} {entry.resource}" if entry.resource else "discovery"


# --- reading the cluster -----------------------------------------------------------------------
async def lft_or_none(cluster: Cluster, name: str) -> Any:
    try:
        return await cluster.lft(name)
    except Exception:  # noqa: BLE001 (404: deleted)
        return None


async def wait_phase(cluster: Cluster, name: str, phases: tuple[str, ...], timeout: float) -> Any:
    async def check() -> Any:
        lft = await cluster.lft(name)
        return lft if (lft.get("status") or {}).get("phase") in phases else None

    return await until(check, timeout=timeout)


async def events_of(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    return [e for e in await cluster.client.list(EVENTS) if e["involvedObject"]["name"] == name]


async def pods_of(cluster: Cluster, name: str, role: str = "trainer") -> list[dict[str, Any]]:
    sel = f"{c.LABEL_JOB_NAME}={name},{c.LABEL_ROLE}={role}"
    return list(await cluster.client.list(f"{PODS}?labelSelector={sel}"))


def job_creates(cluster: Cluster, name: str) -> dict[str, int]:
    """Create requests that reached the API per child name (any answer)."""
    counts: dict[str, int] = {}
    for r in cluster.api.requests_for("create"):
        body_name = r.name or ""
        counts[body_name] = counts.get(body_name, 0) + 1
    return counts


async def duplicates(cluster: Cluster, name: str, preflight: bool) -> list[str]:
    """Children beyond one of each kind, trainer Jobs ever run beyond one, duplicate Events
    (same reason and message posted twice)."""
    found = []
    kids = await cluster.children(name)
    want = {"configmaps": 1, "services": 1, "jobs": 2 if preflight else 1}
    for kind, n in want.items():
        if len(kids[kind]) > n:
            found.append(f"{len(kids[kind])} {kind}")
    owners = {p["metadata"]["ownerReferences"][0]["uid"] for p in await pods_of(cluster, name)}
    if len(owners) > 1:
        found.append(f"{len(owners)} training Jobs ran")
    seen: dict[tuple[str, str], int] = {}
    for e in await events_of(cluster, name):
        key = (e["reason"], e.get("message", ""))
        seen[key] = seen.get(key, 0) + int(e.get("count") or 1)
    found += [f"event {k[0]} x{v} ({k[1][:60]})" for k, v in seen.items() if v > 1]
    return found


def status_errors(
    lft: Any, phase: str, restarts: int = 0, max_steps: int | None = None
) -> list[str]:
    """What is wrong with a finished job's status."""
    st = (lft or {}).get("status") or {}
    errs = []
    if st.get("phase") != phase:
        errs.append(f"phase {st.get('phase')} != {phase}")
    if int(st.get("restarts") or 0) != restarts:
        errs.append(f"restarts {st.get('restarts')} != {restarts}")
    deg = condition(lft, c.COND_DEGRADED)
    if deg is not None and deg["status"] == "True":
        errs.append(f"Degraded: {deg.get('reason')}")
    if phase == c.PHASE_SUCCEEDED:
        failed = condition(lft, c.COND_FAILED)
        if failed is not None and failed["status"] == "True":
            errs.append("Failed=True on a Succeeded job")
        running = condition(lft, c.COND_RUNNING)
        if running is not None and running["status"] == "True":
            errs.append("Running=True on a finished job")
        step = (st.get("progress") or {}).get("step")
        if max_steps is not None and step is not None and step != max_steps:
            errs.append(f"progress.step {step} != {max_steps}")
    types = [x["type"] for x in st.get("conditions") or []]
    if len(types) != len(set(types)):
        errs.append(f"duplicate condition types {types}")
    return errs


def train_steps(trace: Path) -> list[int]:
    """Steps of the training-loss records in trace.jsonl, in the order they were written."""
    if not trace.exists():
        return []
    out = []
    for line in trace.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec and not rec.get("eval"):
            out.append(int(rec["step"]))
    return out


def steps_lost(steps: list[int]) -> int:
    """Steps trained twice: for each resume (a step not above the previous), the redone ones."""
    return sum(a - b + 1 for a, b in zip(steps, steps[1:], strict=False) if b <= a)


def elapsed(start: float) -> float:
    return round(time.monotonic() - start, 1)
