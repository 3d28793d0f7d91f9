"""Telemetry step-time overhead on one GPU, side by side with a no-telemetry baseline.

    python bench/telemetry_overhead.py --shape llama2-7b --micro-batch 16 --out results/x.jsonl

One model (random weights, bf16, LoRA r=16 on q,k,v,o, seq 512) in one process; each round
runs the trainer path (LoRATrainer) three times on the same model: no telemetry, telemetry
every step, telemetry every 10 steps, each with warm-up then timed steps, the order rotating
between rounds. Reported: median over rounds of the paired ratio (variant / baseline) - 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from trainer_throughput import SHAPES, StepTimer, batches, build_model, collate, spec_for

from lora_trainer.config import OutputLayout
from lora_trainer.model import apply_lora
from lora_trainer.telemetry import TelemetryCollector
from lora_trainer.train import LoRATrainer, training_arguments


def timed_run(
    model: Any, shape: str, mb: int, seq: int, warmup: int, steps: int, interval: int | None
) -> float:
    """Seconds per step over the timed steps."""
    spec = spec_for(seq, mb, warmup + steps)
    args = training_arguments(spec, OutputLayout(Path("/tmp/bench-out")), False, False)
    timer = StepTimer(warmup)
    callbacks: list[Any] = [timer]
    telemetry = TelemetryCollector(interval) if interval else None
    if telemetry is not None:
        callbacks.insert(0, telemetry)
    data = batches((warmup + steps) * mb, mb, seq, SHAPES[shape]["vocab_size"])
    trainer = LoRATrainer(
        model=model, args=args, train_dataset=data, data_collator=collate, callbacks=callbacks
    )
    if telemetry is not None:
        telemetry.attach(trainer)
    trainer.train()
    return (timer.t1 - timer.t0) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    spec = spec_for(a.seq, a.micro_batch, 1)
    model = apply_lora(build_model(a.shape, a.seq), spec.lora, False)  # type: ignore[arg-type]
    variants: dict[str, int | None] = {"off": None, "every_step": 1, "every_10": 10}
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for r in range(a.rounds):
        for name in order[r % 3 :] + order[: r % 3]:
            times[name].append(
                timed_run(model, a.shape, a.micro_batch, a.seq, a.warmup, a.steps, variants[name])
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
            },
            "command": " ".join(["python", *sys.argv]),
            "time": time.time(),
        }
        print(json.dumps(row), flush=True)
        with a.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
