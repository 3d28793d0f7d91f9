"""The health rules inside the trainer (global rank 0), on the records it writes.

`HealthMonitor` observes every trace.jsonl record on the trace writer's thread (so the
training loop never waits for the rules), evaluates `lora_operator.health` every
`spec.health.evaluationIntervalSteps` steps on the full-resolution statistics, writes a
`health` record to the trace whenever the verdict or the set of firing rules changes, and
holds what `/health` and the `lora_trainer_health_*` metrics show.

With `spec.health.onDegraded: Fail`, a Degraded or Critical verdict requests a clean stop:
`HealthStopCallback` checkpoints at the next step boundary (all ranks agree through one small
all_reduce every evaluation interval) and `train.run` exits 86 (EXIT_HEALTH_STOP) after
`mark_health_stop`, which the Job's podFailurePolicy turns into FailJob. Suspend and Alert
are the operator's business: the trainer only reports.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState

from lora_operator.api import constants as c
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.health import HealthConfig, HealthEngine

log = logging.getLogger(__name__)
STOP_VERDICTS = (c.VERDICT_DEGRADED, c.VERDICT_CRITICAL)


@dataclass(frozen=True)
class RuleSnapshot:
    rule: str
    severity: str
    firing: bool
    last_firing_step: int | None


@dataclass(frozen=True)
class HealthSnapshot:
    """What the metrics show (a consistent copy, taken under the monitor's lock)."""

    verdict: str
    step: int
    rules: tuple[RuleSnapshot, ...]
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)  # latest eval etc.


METRIC_FIELDS = {  # /health "metrics" key -> trace record field
    "loss": "loss",
    "eval_loss": "eval_loss",
    "bleu": "eval_bleu",
    "rouge_l": "eval_rougeL",
}


class ProgressTracker:
    """Latest metrics, epoch, throughput and ETA from the trace records of this process.

    Rates come from wall time between the records this process saw (evaluation and
    checkpoint time included, as the user waits for them too); a resumed run's replayed
    records do not count.
    """

    def __init__(self, total_steps: int | None) -> None:
        self.total_steps = total_steps
        self.metrics: dict[str, float] = {}
        self.epoch: float | None = None
        self.first: tuple[float, int] | None = None  # (time, step) of the first training record
        self.last: tuple[float, int, int] | None = None  # (time, step, tokens)
        self.tokens_per_second: float | None = None

    def observe(self, record: Mapping[str, Any], now: float, timed: bool = True) -> None:
        """One record; TIMED False for a resumed run's replayed records (no rates)."""
        for key, field in METRIC_FIELDS.items():
            value = record.get(field)
            if isinstance(value, int | float):
                self.metrics[key] = float(value)
        if isinstance(record.get("epoch"), int | float):
            self.epoch = float(record["epoch"])
        step, tokens = record.get("step"), record.get("tokens")
        if not timed or "loss" not in record or not isinstance(step, int):
            return
        if self.first is None:
            self.first = (now, step)
        if isinstance(tokens, int):
            if self.last is not None and now > self.last[0] and tokens >= self.last[2]:
                rate = (tokens - self.last[2]) / (now - self.last[0])
                old = self.tokens_per_second
                self.tokens_per_second = rate if old is None else 0.7 * old + 0.3 * rate
            self.last = (now, step, tokens)

    def report(self, now: float) -> dict[str, Any]:
        metrics: dict[str, Any] = dict(self.metrics)
        if self.tokens_per_second is not None:
            metrics["tokens_per_second"] = round(self.tokens_per_second, 1)
        eta = None
        if self.first is not None and self.last is not None and self.total_steps:
            t0, s0 = self.first
            t1, s1 = self.last[0], self.last[1]
            if s1 > s0 and t1 > t0:
                eta = round(max(0, self.total_steps - s1) * (t1 - t0) / (s1 - s0), 1)
        return {"metrics": metrics, "epoch": self.epoch, "eta_seconds": eta}


class HealthMonitor:
    """Health rules over the trace records of this run; thread-safe."""

    def __init__(
        self,
        spec: LoRAFineTuneSpec,
        total_steps: int | None,
        data_stats: Mapping[str, Any] | None = None,
    ) -> None:
        config = HealthConfig.from_spec(spec.health, spec.training, spec.lora, total_steps)
        self.engine = HealthEngine(config)
        if data_stats is not None:
            self.engine.observe_data_stats(data_stats)
        self.policy = spec.health.on_degraded
        self.total_steps = total_steps
        self.stop_reason: str | None = None
        self._lock = threading.Lock()
        self._last: tuple[str, tuple[str, ...]] | None = None
        self._warned = 0
        self.emit: Any = None  # set to TraceWriter.write to record verdict changes
        self.progress = ProgressTracker(total_steps)

    def replay(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Feed a resumed run's earlier records, so the verdicts continue where they were."""
        for record in records:
            if "health" not in record:
                self.observe(record, emit=False)

    def observe(self, record: Mapping[str, Any], emit: bool = True) -> None:
        """One trace record (the trace writer's thread); never raises."""
        if "health" in record:
            return  # our own verdict records
        try:
            with self._lock:
                self.progress.observe(record, time.monotonic(), timed=emit)
                evaluated = self.engine.observe(record)
                report = self.engine.report() if evaluated else None
                self._log_warnings()
        except Exception:  # the rules must never stop training
            log.exception("health: cannot evaluate step %s", record.get("step"))
            return
        if report is None:
            return
        state = (report["verdict"], tuple(r["rule"] for r in report["rules"]))
        if state == self._last:
            return
        self._last = state
        log.log(
            logging.WARNING if report["rules"] else logging.INFO,
            "health: step %d verdict %s%s",
            report["step"],
            report["verdict"],
            "".join(f"; {r['rule']} ({r['severity']}): {r['message']}" for r in report["rules"]),
        )
        if emit and self.emit is not None:
            self.emit({"step": report["step"], "health": report})
        if self.policy == "Fail" and report["verdict"] in STOP_VERDICTS and not self.stop_reason:
            first = report["rules"][0]
            self.stop_reason = f"{first['rule']}: {first['message']}"
            log.error("health: onDegraded=Fail: stopping (%s)", self.stop_reason)

    def _log_warnings(self) -> None:
        for warning in self.engine.warnings[self._warned :]:
            log.warning("health: %s", warning)
        self._warned = len(self.engine.warnings)

    def report(self) -> dict[str, Any]:
        """The /health body: verdict, step, progress, firing rules with evidence."""
        with self._lock:
            body = self.engine.report()
            total = self.total_steps
            body["progress"] = round(body["step"] / total, 4) if total else None
            body["total_steps"] = total
            body |= self.progress.report(time.monotonic())
        body["on_degraded"] = self.policy
        body["stopping"] = self.stop_reason
        body["time"] = time.time()
        return body

    def snapshot(self) -> HealthSnapshot:
        with self._lock:
            engine = self.engine
            rules = tuple(
                RuleSnapshot(s.name, s.severity, s.firing, s.last_firing_step)
                for s in engine.states.values()
            )
            return HealthSnapshot(engine.verdict, engine.step, rules, dict(self.progress.metrics))


class HealthStopCallback(TrainerCallback):
    """Stops every rank cleanly (checkpoint first) once the monitor asks for it."""

    def __init__(self, monitor: HealthMonitor | None, interval: int, world_size: int) -> None:
        self.monitor = monitor  # None on ranks other than global rank 0
        self.interval = max(1, interval)
        self.world_size = world_size
        self.reason: str | None = None

    def on_step_end(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        local = self.monitor is not None and self.monitor.stop_reason is not None
        if self.world_size > 1:
            if state.global_step % self.interval:
                return  # every rank takes part in the same steps' all_reduce
            flag = torch.tensor([1.0 if local else 0.0], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        else:
            stop = local
        if stop and self.reason is None:
            self.reason = (
                self.monitor.stop_reason if self.monitor is not None else None
            ) or "health policy (decided on global rank 0)"
            control.should_save = True
            control.should_training_stop = True
