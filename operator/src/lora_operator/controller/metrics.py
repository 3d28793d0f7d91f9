"""The operator's own Prometheus metrics (prefix `lora_operator_`).

One `OperatorMetrics` per operator process, on its own registry (never the global one, so
tests and embedded use do not collide). The reconcile loop calls `observe()` after every
reconcile and `forget()` on deletion; the job and degraded families are computed from that
map at scrape time, so a job that disappears leaves no stale series behind.

Families:
- lora_operator_jobs{phase}: LoRAFineTunes per phase; every phase of constants.PHASES is
  exported (0 when none), so `sum()` is the number of jobs with a phase.
- lora_operator_degraded{namespace,name,reason}: 1 while a job is Degraded (reason: the
  health rule); the series is absent otherwise.
- lora_operator_degraded_transitions_total{reason}: entries into Degraded, or reason changes.
- lora_operator_health_read_errors_total{kind}: failed reads of a trainer's /health
  (kind: unreachable, timeout, http_status, malformed).
- lora_operator_reconcile_duration_seconds: histogram of reconcile durations.
- lora_operator_build_info{version}: 1.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from lora_operator import __version__
from lora_operator.api import constants as c

PREFIX: Final = "lora_operator_"

READ_ERROR_UNREACHABLE: Final = "unreachable"
READ_ERROR_TIMEOUT: Final = "timeout"
READ_ERROR_HTTP_STATUS: Final = "http_status"
READ_ERROR_MALFORMED: Final = "malformed"
READ_ERROR_KINDS: Final = (
    READ_ERROR_UNREACHABLE,
    READ_ERROR_TIMEOUT,
    READ_ERROR_HTTP_STATUS,
    READ_ERROR_MALFORMED,
)

# 1 ms .. 10 s: a reconcile is a few API calls plus, for running jobs, one /health read.
RECONCILE_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

JobKey = tuple[str, str]  # (namespace, name)
JobState = tuple[str | None, str | None]  # (phase, degraded reason)


class _JobsCollector(Collector):
    """Computes lora_operator_jobs and lora_operator_degraded from the job map at scrape."""

    def __init__(self, owner: OperatorMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[Metric]:
        jobs = self._owner.snapshot()
        per_phase = Tally(phase for phase, _ in jobs.values() if phase is not None)
        phases = GaugeMetricFamily(
            PREFIX + "jobs", "LoRAFineTune resources per status.phase.", labels=["phase"]
        )
        for phase in (*c.PHASES, *sorted(set(per_phase) - set(c.PHASES))):
            phases.add_metric([phase], float(per_phase[phase]))
        yield phases
        degraded = GaugeMetricFamily(
            PREFIX + "degraded",
            "1 while a LoRAFineTune is Degraded; reason is the health rule that fired.",
            labels=["namespace", "name", "reason"],
        )
        for (namespace, name), (_, reason) in sorted(jobs.items()):
            if reason is not None:
                degraded.add_metric([namespace, name, reason], 1.0)
        yield degraded


class OperatorMetrics:
    """The operator's metrics on a private registry; every method is thread-safe."""

    def __init__(self, version: str = __version__) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._jobs: dict[JobKey, JobState] = {}
        self._transitions = Counter(
            PREFIX + "degraded_transitions",
            "Times a LoRAFineTune entered Degraded or changed its Degraded reason.",
            ["reason"],
            registry=self.registry,
        )
        self._read_errors = Counter(
            PREFIX + "health_read_errors",
            "Failed reads of a trainer's /health endpoint, by kind.",
            ["kind"],
            registry=self.registry,
        )
        for kind in READ_ERROR_KINDS:
            self._read_errors.labels(kind=kind)  # exported as 0 from the start
        self._reconcile = Histogram(
            PREFIX + "reconcile_duration_seconds",
            "Duration of one reconcile of a LoRAFineTune.",
            buckets=RECONCILE_BUCKETS,
            registry=self.registry,
        )
        build_info = Gauge(
            PREFIX + "build_info",
            "Operator build information; always 1.",
            ["version"],
            registry=self.registry,
        )
        build_info.labels(version=version).set(1)
        self.registry.register(_JobsCollector(self))

    def observe(
        self, namespace: str, name: str, phase: str | None, degraded_reason: str | None
    ) -> None:
        """Record a job's state after a reconcile (degraded_reason None: not Degraded)."""
        key = (namespace, name)
        with self._lock:
            previous = self._jobs.get(key, (None, None))[1]
            self._jobs[key] = (phase, degraded_reason)
            if degraded_reason is not None and degraded_reason != previous:
                self._transitions.labels(reason=degraded_reason).inc()

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted job from the phase counts and its degraded series."""
        with self._lock:
            self._jobs.pop((namespace, name), None)

    def health_read_error(self, kind: str) -> None:
        """Count a failed /health read; kind is one of READ_ERROR_KINDS."""
        if kind not in READ_ERROR_KINDS:
            raise ValueError(f"unknown health read error kind {kind!r}")
        self._read_errors.labels(kind=kind).inc()

    @contextmanager
    def time_reconcile(self) -> Iterator[None]:
        """Observe the duration of the enclosed reconcile (also when it raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._reconcile.observe(time.perf_counter() - start)

    def snapshot(self) -> dict[JobKey, JobState]:
        """A copy of the job map: (namespace, name) -> (phase, degraded reason)."""
        with self._lock:
            return dict(self._jobs)

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)
