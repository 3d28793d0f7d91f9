"""Telemetry step-time overhead on one GPU, side by side with a no-telemetry baseline.

    python bench/telemetry_overhead.py --shape llama2-7b --micro-batch 16 --out results/x.jsonl
    python bench/telemetry_overhead.py --shape llama2-7b --micro-batch 16 --zero 2 --out ...

One model (random weights, bf16, LoRA r=16 on q,k,v,o, seq 512) in one process; each round
runs the trainer path (LoRATrainer with the trace writer, as in the pods) three times on the
same model: no telemetry, telemetry every step, telemetry every 10 steps, each with warm-up
then timed steps, the order rotating between rounds. With --zero (DeepSpeed, one process) or
--single-run, all rounds run as blocks of one training run instead (a model cannot be wrapped
by a second DeepSpeed engine): the telemetry interval switches per block and each block's
timed steps are timed alone.
Reported: median over rounds of the paired ratio (variant / baseline) - 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from throughput import (
    SHAPES,
    StepTimer,
    batches,
    build_model,
    collate,
    spec_for,
    train_as_pods,
)
from transformers import TrainerCallback

from lora_trainer.config import OutputLayout
from lora_trainer.model import apply_lora
from lora_trainer.telemetry import TelemetryCollector
from lora_trainer.trace import TraceWriter
from lora_trainer.train import LoRATrainer, TraceCallback, training_arguments

TRACE = Path("/tmp/bench-out/trace.jsonl")  # written as the pods write it (every step)
MODES: list[str] = []  # collection mode seen (torch / zero-fragments / zero-gathered)


def timed_run(
    model: Any,
    shape: str,
    mb: int,
    seq: int,
    warmup: int,
    steps: int,
    interval: int | None,
) -> float:
    """Seconds per step over the timed steps (a fresh Trainer on the same model)."""
    spec = spec_for(seq, mb, warmup + steps)
    args = training_arguments(spec, OutputLayout(Path("/tmp/bench-out")), False, False)
    timer = StepTimer(warmup)
    telemetry = TelemetryCollector(interval) if interval else None
    writer = TraceWriter(TRACE)
    callbacks: list[Any] = [TraceCallback(writer, telemetry), timer]
    if telemetry is not None:
        callbacks.insert(0, telemetry)
    data = batches((warmup + steps) * mb, mb, seq, SHAPES[shape]["vocab_size"])
    trainer = LoRATrainer(
        model=model, args=args, train_dataset=data, data_collator=collate, callbacks=callbacks
    )
    if telemetry is not None:
        telemetry.attach(trainer)
    trainer.train()
    writer.close()
    if telemetry is not None:
        MODES.append(telemetry.mode)
    return (timer.t1 - timer.t0) / steps


class SwitchedCollector(TelemetryCollector):
    """Telemetry whose interval the block schedule switches (None: collect nothing)."""

    def __init__(self) -> None:
        super().__init__(1)
        self.every: int | None = None

    def due(self, step_after: int) -> bool:
        return self.every is not None and step_after % self.every == 0


class BlockTimer(TrainerCallback):
    """Runs blocks of (variant, warm-up + timed steps) in one training run; times each."""

    def __init__(
        self, telemetry: SwitchedCollector, blocks: list[str], warmup: int, steps: int
    ) -> None:
        self.telemetry, self.blocks, self.warmup, self.steps = telemetry, blocks, warmup, steps
        self.times: dict[str, list[float]] = {}
        self.t0 = 0.0
        self._set(0)

    def _set(self, block: int) -> None:
        if block < len(self.blocks):
            self.telemetry.every = VARIANTS[self.blocks[block]]

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        size = self.warmup + self.steps
        block, pos = divmod(state.global_step, size)
        if pos == self.warmup:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()
        elif pos == 0 and block > 0:
            torch.cuda.synchronize()
            name = self.blocks[block - 1]
            self.times.setdefault(name, []).append((time.perf_counter() - self.t0) / self.steps)
            self._set(block)


VARIANTS: dict[str, int | None] = {"off": None, "every_step": 1, "every_10": 10}


def single_run(model: Any, a: argparse.Namespace) -> dict[str, list[float]]:
    """All rounds in ONE training run (one DeepSpeed engine): blocks switch the interval."""
    order = list(VARIANTS)
    blocks = [n for r in range(a.rounds) for n in order[r % 3 :] + order[: r % 3]]
    total = len(blocks) * (a.warmup + a.steps)
    spec = spec_for(a.seq, a.micro_batch, total, a.zero)
    args = training_arguments(spec, OutputLayout(Path("/tmp/bench-out")), False, False)
    telemetry = SwitchedCollector()
    timer = BlockTimer(telemetry, blocks, a.warmup, a.steps)
    data = batches(total * a.micro_batch, a.micro_batch, a.seq, SHAPES[a.shape]["vocab_size"])
    train_as_pods(model, args, data, telemetry, timer, TRACE)
    MODES.append(telemetry.mode)
    return timer.times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--zero", type=int, default=None, help="DeepSpeed ZeRO stage (1 process)")
    p.add_argument(
        "--single-run",
        action="store_true",
        help="all rounds in one training run, switching the interval per block (always with "
        "--zero: a model cannot be wrapped by a second DeepSpeed engine)",
    )
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.zero is not None:  # a one-process DeepSpeed world
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        for key, value in (env | {"MASTER_PORT": "29533"}).items():
            os.environ.setdefault(key, value)
    spec = spec_for(a.seq, a.micro_batch, 1)
    model = apply_lora(build_model(a.shape, a.seq), spec.lora, False)  # type: ignore[arg-type]
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    order = list(VARIANTS)
    if a.single_run or a.zero is not None:
        times = single_run(model, a)
    else:
        for r in range(a.rounds):
            for name in order[r % 3 :] + order[: r % 3]:
                times[name].append(
                    timed_run(
                        model,
                        a.shape,
                        a.micro_batch,
                        a.seq,
                        a.warmup,
                        a.steps,
                        VARIANTS[name],
                    )
                )
    import peft
    import transformers

    for name in ("every_step", "every_10"):
        ratios = [t / b - 1 for t, b in zip(times[name], times["off"], strict=True)]
        row = {
            "model": a.shape,
            "micro_batch": a.micro_batch,
            "seq_len": a.seq,
            "variant": name,
            "deepspeed_zero": a.zero,
            "method": "blocks in one run" if a.single_run or a.zero is not None else "runs",
            "collection": sorted(set(MODES)),
            "overhead_median": round(statistics.median(ratios), 5),
            "overhead_per_round": [round(x, 5) for x in ratios],
            "step_s_off": [round(x, 5) for x in times["off"]],
            "step_s": [round(x, 5) for x in times[name]],
            "timed_steps": a.steps,
            "gpu": torch.cuda.get_device_name(),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                "deepspeed": _deepspeed_version(),
            },
            "command": " ".join(["python", *sys.argv]),
            "time": time.time(),
        }
        print(json.dumps(row), flush=True)
        with a.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def _deepspeed_version() -> str | None:
    try:
        import deepspeed
    except ImportError:
        return None
    return str(deepspeed.__version__)


if __name__ == "__main__":
    main()
