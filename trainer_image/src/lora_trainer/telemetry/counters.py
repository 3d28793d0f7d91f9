"""Per-rank metrics (catalog source "rank"), written by every rank's process.

Under `lora-train launch` each rank writes them through prometheus_client's multiprocess mode
(`$PROMETHEUS_MULTIPROC_DIR`, created and wiped by the launcher); local rank 0 serves the
sum (counters, histograms) or the largest rank's value (gauges, mode `max`). Without that
variable (single-process `lora-train`) the exporter registers `RankMetrics` as a plain
collector. Counting costs no device sync: rows and positions come from tensor shapes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from transformers import TrainerCallback, TrainerControl, TrainerState

from lora_trainer.telemetry.catalog import PREFIX, STEP_SECONDS_BUCKETS, rank_metrics

ENV_PROM_DIR = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The multiprocess directory of this process (created if missing), or None."""
    path = os.environ.get(ENV_PROM_DIR)
    if not path:
        return None
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


class RankMetrics(Collector):
    """This rank's metrics, built from the catalog; GPU memory gauges only where CUDA is.

    registry=None: in multiprocess mode the values live in files that the serving process's
    MultiProcessCollector reads; in a single process `collect()` exposes them.
    """

    def __init__(self, cuda: bool | None = None) -> None:
        multiprocess_dir()
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.counters: dict[str, Counter] = {}
        self.gauges: dict[str, Gauge] = {}
        self.histograms: dict[str, Histogram] = {}
        for spec in rank_metrics():
            if spec.when == "cuda" and not self.cuda:
                continue
            if spec.type == "counter":
                self.counters[spec.name] = Counter(spec.name, spec.help, registry=None)
            elif spec.type == "histogram":
                self.histograms[spec.name] = Histogram(
                    spec.name, spec.help, registry=None, buckets=STEP_SECONDS_BUCKETS
                )
            else:
                mode: Any = spec.mode
                self.gauges[spec.name] = Gauge(
                    spec.name, spec.help, registry=None, multiprocess_mode=mode
                )

    def collect(self) -> Iterable[Metric]:
        for group in (self.counters, self.gauges, self.histograms):
            for metric in group.values():
                for family in metric.collect():
                    # as in multiprocess mode: no *_created series (a restart resets anyway)
                    family.samples = [x for x in family.samples if not x.name.endswith("_created")]
                    yield family

    def record_step(self, samples: int, tokens: int, seconds: float) -> None:
        """One optimizer step of this rank: its rows and token positions, its wall time."""
        self.counters[PREFIX + "samples_total"].inc(samples)
        self.counters[PREFIX + "tokens_total"].inc(tokens)
        self.histograms[PREFIX + "step_duration_seconds"].observe(seconds)
        self.gauges[PREFIX + "last_step_timestamp_seconds"].set(time.time())
        if self.cuda:
            self.gauges[PREFIX + "gpu_memory_allocated_bytes"].set(torch.cuda.memory_allocated())
            self.gauges[PREFIX + "gpu_memory_reserved_bytes"].set(torch.cuda.memory_reserved())
            self.gauges[PREFIX + "gpu_memory_peak_bytes"].set(torch.cuda.max_memory_allocated())


class RankMetricsCallback(TrainerCallback):
    """Counts the rows and token positions each training forward sees; records every step.

    A forward pre-hook on the (unwrapped) model counts while the model is in training mode,
    so evaluation and generation are not counted.
    """

    def __init__(self, metrics: RankMetrics) -> None:
        self.metrics = metrics
        self._samples = 0
        self._tokens = 0
        self._start = 0.0
        self._hook: Any = None

    def _count(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
            self._samples += int(ids.shape[0])
            self._tokens += ids.numel()

    def on_train_begin(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        if self._hook is None and isinstance(model, torch.nn.Module):
            self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def on_step_begin(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._start = time.monotonic()

    def on_step_end(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.metrics.record_step(self._samples, self._tokens, time.monotonic() - self._start)
        self._samples = self._tokens = 0

    def on_train_end(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
