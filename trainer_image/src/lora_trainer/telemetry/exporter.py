"""Prometheus /metrics for the trainer (docs: docs/metrics.md, generated from catalog.py).

Local rank 0 of each node serves one registry on `spec.monitoring.port`. It holds the
per-rank metrics (telemetry.counters: the multiprocess collector when
`PROMETHEUS_MULTIPROC_DIR` is set, else this process's `RankMetrics`) and, on global rank 0,
`LoRACollector`: the job-wide families of the catalog (latest LoRA/Adam statistics, run
info, training data statistics). Every family's name, type, help and labels come from the
catalog; this module only fills in values.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import statistics
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from lora_operator.api import constants as c
from lora_operator.api.http import TEXT_PLAIN, QuietHandler
from lora_trainer.health_monitor import HealthMonitor, HealthSnapshot
from lora_trainer.telemetry.catalog import (
    NONFINITE_TENSORS,
    RUN_INFO_LABELS,
    MetricDef,
    job_metrics,
)
from lora_trainer.telemetry.collect import TelemetryCollector
from lora_trainer.telemetry.counters import RankMetrics, multiprocess_dir
from lora_trainer.telemetry.stats import StepStats
from lora_trainer.trace import json_safe

if TYPE_CHECKING:
    from lora_operator.api.spec import LoRAFineTuneSpec

log = logging.getLogger(__name__)
Family = CounterMetricFamily | GaugeMetricFamily


def _value(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _family(m: MetricDef) -> Family:
    if m.type == "counter":
        return CounterMetricFamily(m.family, m.help, labels=m.labels)
    return GaugeMetricFamily(m.family, m.help, labels=m.labels)


def _fill_step(fam: Family, m: MetricDef, s: StepStats) -> None:
    fam.add_metric([], _value(getattr(s, m.field)))


def _fill_count(fam: Family, m: MetricDef, s: StepStats) -> None:
    fam.add_metric([], len(getattr(s, m.field)))


def _fill_group(fam: Family, m: MetricDef, s: StepStats) -> None:
    for group, value in enumerate(getattr(s, m.field)):
        fam.add_metric([str(group)], _value(value))


def _fill_tensor(fam: Family, m: MetricDef, s: StepStats) -> None:
    for tensor in NONFINITE_TENSORS:
        fam.add_metric([tensor], _value(getattr(s, m.field + tensor)))


def _fill_matrix_median(fam: Family, m: MetricDef, s: StepStats) -> None:
    for matrix in ("A", "B"):
        vals = [_value(getattr(x, m.field)) for x in s.matrices if x.matrix == matrix]
        fam.add_metric([matrix], _median(vals))


def _fill_module_median(fam: Family, m: MetricDef, s: StepStats) -> None:
    fam.add_metric([], _median([_value(getattr(x, m.field)) for x in s.modules]))


def _fill_layer(fam: Family, m: MetricDef, s: StepStats) -> None:
    squares: dict[tuple[int, str], float] = defaultdict(float)
    for x in s.matrices:
        norm = getattr(x, m.field)  # None (no grad) adds nothing to the layer's norm
        squares[(x.layer, x.matrix)] += 0.0 if norm is None else float(norm) ** 2
    for (layer, matrix), sq in sorted(squares.items()):
        fam.add_metric([str(layer), matrix], math.sqrt(sq))


def _fill_matrix(fam: Family, m: MetricDef, s: StepStats) -> None:
    for x in s.matrices:
        labels = [str(x.layer), x.module, x.matrix]
        fam.add_metric(labels, _value(getattr(x, m.field)))


def _fill_module(fam: Family, m: MetricDef, s: StepStats) -> None:
    for x in s.modules:
        fam.add_metric([str(x.layer), x.module], _value(getattr(x, m.field)))


# catalog scope -> how a StepStats fills the family
STEP_FILLERS: dict[str, Callable[[Family, MetricDef, StepStats], None]] = {
    "step": _fill_step,
    "count": _fill_count,
    "group": _fill_group,
    "tensor": _fill_tensor,
    "matrix_median": _fill_matrix_median,
    "module_median": _fill_module_median,
    "layer": _fill_layer,
    "matrix": _fill_matrix,
    "module": _fill_module,
}


class LoRACollector(Collector):
    """Custom collector (global rank 0): the catalog's job-wide families.

    `run_info`: the labels of lora_trainer_run_info (see `run_info_labels`); `data`: the
    training split's DataStats as a dict. Families of the latest LoRA statistics appear after
    the first collection; per-module families only when `per_module`.
    """

    def __init__(
        self,
        telemetry: TelemetryCollector,
        per_module: bool = True,
        run_info: Mapping[str, str] | None = None,
        data: Mapping[str, Any] | None = None,
        health: HealthMonitor | None = None,
    ) -> None:
        self.telemetry = telemetry
        self.per_module = per_module
        self.run_info = run_info
        self.data = data
        self.health = health

    def collect(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[Metric]:
        stats = self.telemetry.latest
        health = self.health.snapshot() if self.health is not None else None
        for m in job_metrics():
            if m.per_module and not self.per_module:
                continue
            fam = _family(m)
            if m.scope == "health":
                if health is None:
                    continue
                _fill_health(fam, m, health)
            elif m.scope == "progress":
                trainer = self.telemetry.trainer
                fam.add_metric([], float(trainer.state.global_step) if trainer else 0.0)
            elif m.scope == "info":
                if self.run_info is None:
                    continue
                fam.add_metric([self.run_info[label] for label in m.labels], 1.0)
            elif m.scope == "data":
                if self.data is None:
                    continue
                fam.add_metric([], _value(self.data[m.field]))
            elif stats is None:
                continue
            elif m.scope == "collector":
                fam.add_metric([], _value(getattr(self.telemetry, m.field)))
            else:
                STEP_FILLERS[m.scope](fam, m, stats)
            yield fam


EVAL_FIELDS = ("eval_loss", "bleu", "rouge_l")  # HealthSnapshot.metrics keys


def _fill_health(fam: Family, m: MetricDef, h: HealthSnapshot) -> None:
    if m.field == "verdict":
        for verdict in (c.VERDICT_UNKNOWN, c.VERDICT_HEALTHY, *c.SEVERITIES):
            fam.add_metric([verdict], 1.0 if verdict == h.verdict else 0.0)
    elif m.field == "firing":
        for rule in h.rules:
            fam.add_metric([rule.rule, rule.severity], 1.0 if rule.firing else 0.0)
    elif m.field == "last_firing_step":
        for rule in h.rules:
            if rule.last_firing_step is not None:
                fam.add_metric([rule.rule], float(rule.last_firing_step))
    elif m.field in EVAL_FIELDS:
        value = h.metrics.get(m.field)
        if value is not None:
            fam.add_metric([], float(value))
    else:
        fam.add_metric([], float(h.step))


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def model_label(source: str) -> str:
    """The model as /metrics names it: the hub id for hf://, else the last path component
    (a local or volume path says nothing useful and shows the host's layout)."""
    if source.startswith("hf://"):
        return source.removeprefix("hf://")
    return source.rstrip("/").rsplit("/", 1)[-1] or source


def run_info_labels(spec: LoRAFineTuneSpec, spec_hash: str, world_size: int) -> dict[str, str]:
    """The lora_trainer_run_info labels of a run (bounded: one value per run)."""
    ds = spec.distributed.deepspeed
    labels = {
        "model": model_label(spec.model.source),
        "r": str(spec.lora.r),
        "alpha": f"{spec.lora.alpha:g}",
        "target_modules": ",".join(sorted(spec.lora.target_modules)),
        "zero_stage": str(ds.zero_stage) if ds is not None else "none",
        "world_size": str(world_size),
        "device": spec.distributed.device,
        "precision": spec.training.precision,
        "torch_version": _version("torch"),
        "transformers_version": _version("transformers"),
        "peft_version": _version("peft"),
        "deepspeed_version": _version("deepspeed"),
        "trainer_version": _version("lora-operator"),
        "spec_hash": spec_hash,
    }
    return {label: labels[label] for label in RUN_INFO_LABELS}


class Exporter:
    """The HTTP server of one process (None where this process serves nothing)."""

    def __init__(self, server: Any = None, registry: CollectorRegistry | None = None) -> None:
        self.server = server
        self.registry = registry

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def build_registry(
    telemetry: TelemetryCollector | None,
    per_module: bool = True,
    *,
    rank_metrics: RankMetrics | None = None,
    run_info: Mapping[str, str] | None = None,
    data: Mapping[str, Any] | None = None,
    health: HealthMonitor | None = None,
) -> CollectorRegistry:
    """Per-rank metrics (multiprocess files, or this process's) plus the LoRA collector."""
    registry = CollectorRegistry()
    if multiprocess_dir() is not None:
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    elif rank_metrics is not None:
        registry.register(rank_metrics)
    if telemetry is not None:
        registry.register(LoRACollector(telemetry, per_module, run_info, data, health))
    return registry


def start_exporter(
    monitoring: Any,
    telemetry: TelemetryCollector | None,
    *,
    rank_metrics: RankMetrics | None = None,
    run_info: Mapping[str, str] | None = None,
    data: Mapping[str, Any] | None = None,
    health: HealthMonitor | None = None,
) -> Exporter:
    """Serve /metrics (and /health on global rank 0) on monitoring.port from local rank 0;
    never fails the run."""
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return Exporter()
    global_zero = int(os.environ.get("RANK", "0")) == 0
    registry = build_registry(
        telemetry if global_zero else None,
        monitoring.per_module,
        rank_metrics=rank_metrics,
        run_info=run_info,
        data=data,
        health=health if global_zero else None,
    )
    try:
        server = serve(monitoring.port, registry, health if global_zero else None)
    except OSError as err:
        log.warning("metrics: cannot serve on port %d: %s", monitoring.port, err)
        return Exporter(registry=registry)
    log.info("metrics: serving /metrics and /health on port %d", monitoring.port)
    return Exporter(server, registry)


def serve(
    port: int, registry: CollectorRegistry, health: HealthMonitor | None
) -> ThreadingHTTPServer:
    """GET /metrics (Prometheus text format), /health (JSON; 404 where the rules do not run,
    i.e. on other ranks than global rank 0), /healthz (liveness: "ok")."""

    class Handler(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/health" and health is not None:
                body = json.dumps(json_safe(health.report())).encode()
                self._send(200, "application/json", body)
            elif path == "/healthz":
                self._send(200, TEXT_PLAIN, b"ok\n")
            else:
                self._send(404, TEXT_PLAIN, b"not found\n")

    server = ThreadingHTTPServer(("", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
