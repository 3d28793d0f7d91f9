"""The training run: spec -> data -> model + LoRA -> HF Trainer -> adapter, trace, summary."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from peft.optimizers import create_loraplus_optimizer
from transformers import (
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from transformers.trainer import TRAINER_STATE_NAME

from lora_operator.api.constants import EXIT_HEALTH_STOP
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_trainer.config import OutputLayout, resolve_uri
from lora_trainer.data import Collator, check_stats, load_dataset, prepare_tokenizer
from lora_trainer.deepspeed_config import build_deepspeed_config
from lora_trainer.evaluate import generation_metrics
from lora_trainer.health_monitor import HealthMonitor, HealthStopCallback
from lora_trainer.launch import mark_health_stop
from lora_trainer.launch_env import world_size
from lora_trainer.model import apply_lora, load_base_model, load_tokenizer
from lora_trainer.speed import apply_performance
from lora_trainer.telemetry import TelemetryCollector
from lora_trainer.telemetry.counters import RankMetrics, RankMetricsCallback
from lora_trainer.telemetry.exporter import run_info_labels, start_exporter
from lora_trainer.trace import TraceWriter, read_trace

log = logging.getLogger(__name__)
EXIT_SIGTERM = 128 + signal.SIGTERM
# HF log keys -> trace.jsonl fields (docs/trace-schema.md).
TRACE_FIELDS = {
    "learning_rate": "lr",
    "grad_norm": "grad_norm",
    "loss": "loss",
    "eval_loss": "eval_loss",
    "eval_bleu": "eval_bleu",
    "eval_rougeL": "eval_rougeL",
}


@dataclass
class RunResult:
    """What a finished (or interrupted) run reports."""

    summary: dict[str, Any]
    interrupted: bool = False
    exit_code: int = 0


class _Stop:
    """Set by SIGTERM; the callback checkpoints and stops at the next step boundary."""

    requested = False

    @classmethod
    def handler(cls, signum: int, frame: FrameType | None) -> None:
        log.warning("signal %d: checkpointing at the end of this step, then stopping", signum)
        cls.requested = True


class TraceCallback(TrainerCallback):
    """Writes a trace.jsonl record per log event (rank 0) and stops cleanly on SIGTERM."""

    def __init__(
        self, writer: TraceWriter | None, telemetry: TelemetryCollector | None = None
    ) -> None:
        self.writer = writer
        self.telemetry = telemetry
        self._step_start = 0.0
        self.step_time = 0.0

    def on_step_begin(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._step_start = time.monotonic()

    def on_step_end(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.step_time = time.monotonic() - self._step_start
        if _Stop.requested:
            control.should_save = True
            control.should_training_stop = True

    def on_log(
        self,
        args: Any,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.writer is None or not state.is_world_process_zero or not logs:
            return
        record: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch}
        record |= {TRACE_FIELDS[k]: v for k, v in logs.items() if k in TRACE_FIELDS}
        if len(record) == 2:
            return  # e.g. the end-of-training summary log: nothing per-step in it
        if "loss" in record:
            record["tokens"] = int(state.num_input_tokens_seen)
            record["step_time"] = self.step_time
        late = None
        if "loss" in record and self.telemetry is not None:
            late = functools.partial(self.telemetry.fields, state.global_step)
        self.writer.write(record, late)
        if "eval_loss" in record or state.global_step % 10 == 0:
            shown = {k: f"{v:.4g}" for k, v in record.items() if isinstance(v, float)}
            log.info("step %d/%d %s", state.global_step, state.max_steps, shown)


class LoRATrainer(Trainer):
    """HF Trainer whose evaluation adds BLEU and ROUGE-L of generated replies.

    The generation metrics join the eval-loss log record, so trace.jsonl has one eval
    record per evaluation; a final evaluate() at a step already evaluated is not repeated.
    """

    def __init__(self, *args: Any, generation: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.remove_callback(PrinterCallback)  # TraceCallback logs compact progress instead
        self.generation = generation
        self._pending: dict[str, float] = {}
        self.history: dict[int, dict[str, float]] = {}  # step -> eval metrics

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        if self.state.global_step in self.history:
            return self.history[self.state.global_step]
        if self.generation and self.generation["metrics"]:
            gen = generation_metrics(
                self.model,
                self.processing_class,
                self.generation["conversations"],
                self.generation["max_samples"],
                self.generation["max_new_tokens"],
            )
            self._pending = {
                f"eval_{k}": v for k, v in gen.items() if k in self.generation["metrics"]
            }
        metrics: dict[str, float] = super().evaluate(*args, **kwargs)
        metrics.update(self._pending)
        self._pending = {}
        self.history[self.state.global_step] = metrics
        return metrics

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._pending and "eval_loss" in logs:
            logs = {**logs, **self._pending}
        super().log(logs, *args, **kwargs)


def training_arguments(
    spec: LoRAFineTuneSpec, layout: OutputLayout, has_eval: bool, resuming: bool
) -> TrainingArguments:
    t = spec.training
    warmup: float = float(t.warmup.steps) if t.warmup.steps is not None else (t.warmup.ratio or 0)
    return TrainingArguments(
        output_dir=str(layout.checkpoints),
        learning_rate=t.learning_rate,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        num_train_epochs=t.epochs if t.epochs is not None else 1.0,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_grad_norm=t.max_grad_norm if t.max_grad_norm > 0 else None,  # type: ignore[arg-type]
        warmup_steps=warmup,
        lr_scheduler_type=t.scheduler,
        weight_decay=t.weight_decay,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        seed=t.seed,
        use_cpu=spec.distributed.device == "cpu",
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval.every_steps,
        # the base model's metrics, evaluated inside the loop (DeepSpeed ZeRO-1/2 engines
        # exist only there)
        eval_on_start=has_eval and not resuming,
        save_strategy="steps",
        save_steps=t.checkpoint_every_steps,
        save_total_limit=2,
        logging_steps=1,
        logging_first_step=True,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        # packed rows carry a 4D mask, which "non_padding" would count as L x L tokens
        include_num_input_tokens_seen="all" if spec.dataset.packing else "non_padding",
        deepspeed=build_deepspeed_config(spec),
        ddp_backend="gloo" if spec.distributed.device == "cpu" and world_size() > 1 else None,
        dataloader_num_workers=0,
        torch_compile=spec.performance.compile,
    )


def spec_hash(spec: LoRAFineTuneSpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_wire(), sort_keys=True).encode()).hexdigest()[:16]


def run(spec: LoRAFineTuneSpec, output: Path) -> RunResult:
    """Train as the spec says; resumable; returns the summary also written to summary.json."""
    started = time.monotonic()
    layout = OutputLayout(output)
    if spec.distributed.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported
    set_seed(spec.training.seed)
    tokenizer = load_tokenizer(spec.model)
    grew = prepare_tokenizer(tokenizer, spec.dataset.chat_template)
    data = load_dataset(spec.dataset, tokenizer, resolve_uri)
    check_stats(data.stats)
    log.info("data: %s", _brief(data.stats.to_dict()))
    base = load_base_model(spec.model, len(tokenizer) if grew else None)
    model = apply_lora(base, spec.lora, spec.training.gradient_checkpointing)
    speed = apply_performance(model, spec)
    has_eval = bool(data.eval)
    resume = _latest_checkpoint(spec, layout)
    args = training_arguments(spec, layout, has_eval, resume is not None)
    writer = TraceWriter(layout.trace) if args.process_index == 0 else None
    if args.process_index == 0:
        layout.root.mkdir(parents=True, exist_ok=True)
        layout.data_stats.write_text(json.dumps(data.stats.to_dict(), indent=2))
    telemetry = TelemetryCollector(spec.monitoring.interval_steps)
    rank_metrics = RankMetrics()
    monitor = _health_monitor(spec, layout, writer, data, resume is not None)
    health_stop = HealthStopCallback(monitor, spec.health.evaluation_interval_steps, world_size())
    trainer = LoRATrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval if has_eval else None,
        data_collator=Collator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[
            telemetry,
            TraceCallback(writer, telemetry),
            RankMetricsCallback(rank_metrics),
            health_stop,
        ],
        generation=_generation_settings(spec, data.eval_conversations) if has_eval else None,
        optimizers=(_loraplus_optimizer(spec, model), None),
    )
    telemetry.attach(trainer)
    exporter = start_exporter(
        spec.monitoring,
        telemetry,
        rank_metrics=rank_metrics,
        run_info=run_info_labels(spec, spec_hash(spec), world_size()),
        data=data.stats.to_dict(),
        health=monitor,
    )
    previous = signal.signal(signal.SIGTERM, _Stop.handler)
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        signal.signal(signal.SIGTERM, previous)
        exporter.close()
        if writer is not None:
            writer.drain()
    if _Stop.requested or health_stop.reason is not None:
        if writer is not None:
            writer.close()
        step = trainer.state.global_step
        if health_stop.reason is None:
            return RunResult({"interrupted_at_step": step}, True, EXIT_SIGTERM)
        log.error("stopped at step %d by the health policy: %s", step, health_stop.reason)
        mark_health_stop(health_stop.reason)
        _leave_together()
        summary = {"health_stop_at_step": step, "reason": health_stop.reason}
        if monitor is not None:
            summary["health"] = monitor.report()
        return RunResult(summary, True, EXIT_HEALTH_STOP)
    final = trainer.evaluate() if has_eval else {}
    trainer.save_model(str(layout.adapter))
    baseline = trainer.history.get(0, {}) if resume is None else {}
    summary = _summary(spec, trainer, data.stats.to_dict(), baseline, final, started, resume)
    summary["adapter"] = str(layout.adapter)  # the directory save_model wrote above
    summary["performance"] = speed.to_dict()
    if monitor is not None and writer is not None:
        writer.drain()  # the final evaluation's record reaches the rules
        summary["health"] = monitor.report()
    if args.process_index == 0:
        if grew:
            tokenizer.save_pretrained(str(layout.adapter))
        layout.summary.write_text(json.dumps(summary, indent=2))
    if writer is not None:
        writer.close()
    _leave_together()
    return RunResult(summary)


def _leave_together() -> None:
    """All ranks leave the process group together (never after SIGTERM, where ranks may stop
    at different steps): a rank whose peer exited mid-collective is aborted by gloo/NCCL."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception as err:  # the run itself is done; never fail it here
            log.warning("distributed shutdown: %s", err)


def _health_monitor(
    spec: LoRAFineTuneSpec,
    layout: OutputLayout,
    writer: TraceWriter | None,
    data: Any,
    resumed: bool,
) -> HealthMonitor | None:
    """The rules on global rank 0, fed by the trace writer; a resumed run replays its trace."""
    if writer is None:
        return None
    t = spec.training
    total = t.max_steps
    if total is None and t.epochs is not None:
        per_step = t.micro_batch_size * t.gradient_accumulation_steps * world_size()
        total = math.ceil(math.ceil(len(data.train) / per_step) * t.epochs)
    monitor = HealthMonitor(spec, total, data.stats.to_dict())
    if resumed and layout.trace.exists():
        writer.drain()
        monitor.replay(read_trace(layout.trace))
    writer.observers.append(monitor.observe)
    monitor.emit = writer.write
    return monitor


def _brief(stats: dict[str, Any]) -> str:
    keys = (
        "samples",
        "malformed",
        "tokens",
        "supervised_fraction",
        "truncation_rate",
        "samples_without_supervision",
        "special_token_ratio",
    )
    return ", ".join(
        f"{k}={stats[k]:.3g}" if isinstance(stats[k], float) else f"{k}={stats[k]}"
        for k in keys
        if k in stats
    )


def _loraplus_optimizer(spec: LoRAFineTuneSpec, model: Any) -> torch.optim.Optimizer | None:
    """LoRA+ (lora_B learns ratio x faster than lora_A), or None for the Trainer's AdamW."""
    ratio = spec.lora.lora_plus_lr_ratio
    if ratio is None:
        return None
    optimizer: torch.optim.Optimizer = create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=spec.training.learning_rate,
        loraplus_lr_ratio=ratio,
        weight_decay=spec.training.weight_decay,
    )
    return optimizer


def _generation_settings(spec: LoRAFineTuneSpec, conversations: Any) -> dict[str, Any]:
    e = spec.training.eval
    return {
        "metrics": [m for m in e.metrics if m != "loss"],
        "conversations": conversations,
        "max_samples": e.max_samples,
        "max_new_tokens": e.max_new_tokens,
    }


def _latest_checkpoint(spec: LoRAFineTuneSpec, layout: OutputLayout) -> str | None:
    if spec.output.resume == "never":
        return None
    return latest_complete_checkpoint(layout.checkpoints)


def latest_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint-N whose save finished, or None.

    HF writes a checkpoint in place, trainer_state.json last; a pod killed mid-save leaves
    a directory without it, and resuming from that would fail on every restart.
    """
    found = sorted(
        (int(p.name.split("-")[1]), p)
        for p in folder.glob("checkpoint-*")
        if p.is_dir() and p.name.split("-")[1].isdigit()
    )
    for _, path in reversed(found):
        try:
            json.loads((path / TRAINER_STATE_NAME).read_text())
        except (OSError, ValueError):
            log.warning("skipping incomplete checkpoint %s (no valid %s)", path, TRAINER_STATE_NAME)
            continue
        log.info("resuming from %s", path)
        return str(path)
    return None


def _summary(
    spec: LoRAFineTuneSpec,
    trainer: Trainer,
    stats: dict[str, Any],
    baseline: dict[str, float],
    final: dict[str, float],
    started: float,
    resumed_from: str | None,
) -> dict[str, Any]:
    return {
        "spec_hash": spec_hash(spec),
        "steps": trainer.state.global_step,
        "tokens": int(trainer.state.num_input_tokens_seen),
        "runtime_seconds": time.monotonic() - started,
        "resumed_from": resumed_from,
        "baseline": baseline,
        "final": final,
        "data": stats,
        "torch": torch.__version__,
    }
