"""Prometheus /metrics for the trainer (docs: /work/shared/design/observability.md).

Local rank 0 of each node serves one registry on `spec.monitoring.port`. It holds the
multiprocess collector when `PROMETHEUS_MULTIPROC_DIR` is set (per-rank counters/gauges)
and, on global rank 0, `LoRACollector`: the job-wide statistics of the latest collection
(per layer/module/matrix when `spec.monitoring.perModule`, medians always).
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from lora_trainer.telemetry.collect import TelemetryCollector
from lora_trainer.telemetry.stats import MatrixStats, StepStats

log = logging.getLogger(__name__)
PREFIX = "lora_trainer_"
MATRIX_LABELS = ["layer", "module", "matrix"]

# (metric suffix, MatrixStats field, help)
MATRIX_GAUGES = [
    ("lora_grad_norm", "grad_norm", "L2 norm of the LoRA matrix gradient before clipping."),
    ("lora_grad_zero_ratio", "grad_zero_fraction", "Fraction of gradient elements exactly 0."),
    ("lora_param_norm", "param_norm", "L2 norm of the LoRA matrix after the step."),
    ("lora_param_norm_init_ratio", "param_norm_ratio", "LoRA matrix norm over its initial norm."),
    ("lora_update_ratio", "update_ratio", "||p_after - p_before|| / ||p_before|| of the step."),
    ("lora_adam_exp_avg_norm", "exp_avg_norm", "L2 norm of Adam's first moment."),
    ("lora_adam_exp_avg_sq_mean", "exp_avg_sq_mean", "Mean of Adam's second moment."),
    ("lora_learning_rate_sum", "lr_sum", "Cumulative learning rate of the matrix's group."),
]


def _value(v: Any) -> float:
    return float("nan") if v is None else float(v)


class LoRACollector(Collector):
    """Custom collector (global rank 0): families from the collector's latest StepStats."""

    def __init__(self, telemetry: TelemetryCollector, per_module: bool = True) -> None:
        self.telemetry = telemetry
        self.per_module = per_module

    def collect(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[Metric]:
        trainer = self.telemetry.trainer
        steps = CounterMetricFamily(PREFIX + "steps", "Optimizer steps done by this process.")
        steps.add_metric([], float(trainer.state.global_step) if trainer is not None else 0.0)
        yield steps
        stats = self.telemetry.latest
        if stats is None:
            return
        yield from self._job(stats)
        yield from self._medians(stats)
        if self.per_module:
            yield from self._per_module(stats)

    def _job(self, s: StepStats) -> Iterator[Metric]:
        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        yield gauge("telemetry_step", "Step of the latest LoRA statistics.", s.step)
        yield gauge(
            "telemetry_timestamp_seconds",
            "Unix time of the latest LoRA statistics.",
            self.telemetry.latest_time,
        )
        yield gauge("loss", "Training loss of the latest collected step.", _value(s.loss))
        yield gauge("grad_norm", "Total gradient L2 norm before clipping.", s.lora_grad_norm)
        yield gauge("lora_modules", "Adapted modules.", len(s.modules))
        yield gauge("lora_grad_none_matrices", "LoRA matrices without a gradient.", s.grad_none)
        lr = GaugeMetricFamily(
            PREFIX + "learning_rate", "Learning rate per group.", labels=["group"]
        )
        lr_sum = GaugeMetricFamily(
            PREFIX + "learning_rate_sum", "Cumulative learning rate per group.", labels=["group"]
        )
        for g, (now, total) in enumerate(zip(s.lr, s.lr_sum, strict=True)):
            lr.add_metric([str(g)], now)
            lr_sum.add_metric([str(g)], total)
        yield lr
        yield lr_sum
        nonfinite = GaugeMetricFamily(
            PREFIX + "nonfinite_elements",
            "Non-finite elements at the latest collection.",
            labels=["tensor"],
        )
        nonfinite.add_metric(["grad"], s.nonfinite_grad)
        nonfinite.add_metric(["param"], s.nonfinite_param)
        nonfinite.add_metric(["exp_avg_sq"], s.nonfinite_exp_avg_sq)
        yield nonfinite

    def _medians(self, s: StepStats) -> Iterator[Metric]:
        for suffix, attr, doc in MATRIX_GAUGES[:5]:
            fam = GaugeMetricFamily(
                PREFIX + suffix + "_median", "Median over modules: " + doc, labels=["matrix"]
            )
            for matrix in ("A", "B"):
                vals = [_value(getattr(m, attr)) for m in s.matrices if m.matrix == matrix]
                fam.add_metric([matrix], statistics.median(vals) if vals else float("nan"))
            yield fam
        dw = [m.dw_rel for m in s.modules]
        yield GaugeMetricFamily(
            PREFIX + "lora_delta_weight_ratio_median",
            "Median over modules of ||scale*B@A||_F / ||W||_F.",
            value=statistics.median(dw) if dw else float("nan"),
        )

    def _per_module(self, s: StepStats) -> Iterator[Metric]:
        for suffix, attr, doc in MATRIX_GAUGES:
            fam = GaugeMetricFamily(PREFIX + suffix, doc, labels=MATRIX_LABELS)
            for m in s.matrices:
                fam.add_metric(_labels(m), _value(getattr(m, attr)))
            yield fam
        dw = GaugeMetricFamily(
            PREFIX + "lora_delta_weight_ratio",
            "||scale*B@A||_F / ||W||_F of the adapted module.",
            labels=["layer", "module"],
        )
        for mod in s.modules:
            dw.add_metric([str(mod.layer), mod.module], mod.dw_rel)
        yield dw


def _labels(m: MatrixStats) -> list[str]:
    return [str(m.layer), m.module, m.matrix]


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
    telemetry: TelemetryCollector | None, per_module: bool = True
) -> CollectorRegistry:
    """Multiprocess collector (when configured) plus the LoRA collector (global rank 0)."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    if telemetry is not None:
        registry.register(LoRACollector(telemetry, per_module))
    return registry


def start_exporter(monitoring: Any, telemetry: TelemetryCollector) -> Exporter:
    """Serve /metrics on monitoring.port from local rank 0; never fails the run."""
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return Exporter()
    global_zero = int(os.environ.get("RANK", "0")) == 0
    registry = build_registry(telemetry if global_zero else None, monitoring.per_module)
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(monitoring.port, registry=registry)
    except OSError as err:
        log.warning("metrics: cannot serve on port %d: %s", monitoring.port, err)
        return Exporter(registry=registry)
    log.info("metrics: serving /metrics on port %d", monitoring.port)
    return Exporter(server, registry)
