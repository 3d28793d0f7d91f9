"""Trainer throughput vs a minimal hand-written PEFT loop, on one GPU.

    python bench/throughput.py --shapes tinyllama-1.1b --out bench/results/throughput.jsonl

Models: Llama-2-7B and TinyLlama-1.1B shapes from config (random weights), bf16, LoRA r=16
alpha 32 dropout 0.05 on q,k,v,o, AdamW, clipping 1.0, gradient accumulation 1, seq 512 and
2048, with and without gradient checkpointing. Every variant runs in its own process (Liger
patches transformers' modules process-wide) on the same seeded model and batches:

- plain: the loop a user writes: peft's get_peft_model, bf16 autocast, fused AdamW, clip;
- trainer: the code the pods run (LoRATrainer + training_arguments + apply_performance from a
  LoRAFineTune spec with default spec.performance, telemetry at its default interval with the
  trace writer, eval off);
- trainer-noopt: the same with spec.performance's fast paths off (adapterFastPath: false,
  fusedKernels: none): what the trainer did before them;
- trainer-auto (with checkpointing only): spec.performance.checkpointing: auto.

Tokens/s counts every input token (no padding in the synthetic batches), timed steps only,
the device synchronised at both ends. MFU = tokens/s x F / 790 TFLOP/s (the dense bf16 peak
the throughput issue uses for an H200), F = 4 x N_matmul + 3 x attention-forward FLOPs per
token: 2 N (forward) + 2 N (input gradients; frozen weights need no weight gradients), LoRA's
own FLOPs ignored, attention 4 x seq x hidden per layer forward, x 3 with its backward.
Recomputation under checkpointing is not counted (it is overhead, not useful work).
Each row also has the first and last timed losses: variants on the same data must agree to
bf16 tolerance (the numerics check of the fast paths on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from lora_operator.api.spec import LoRAFineTuneSpec

PEAK_FLOPS = 790e12
SHAPES = {
    "llama2-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
    },
    "tinyllama-1.1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
    "tiny-debug": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
}
# (shape, seq) -> micro-batch (without checkpointing, with it)
MICRO_BATCH = {
    ("llama2-7b", 512): (16, 16),
    ("llama2-7b", 2048): (8, 16),
    ("tinyllama-1.1b", 512): (32, 32),
    ("tinyllama-1.1b", 2048): (16, 16),
    ("tiny-debug", 512): (4, 4),
    ("tiny-debug", 2048): (2, 2),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def flops_per_token(shape: str, seq: int) -> float:
    s = SHAPES[shape]
    h, inter, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    n_matmul = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + h * s["vocab_size"]
    return 4.0 * n_matmul + 3.0 * (4.0 * seq * h * layers)


def build_model(shape: str, seq: int) -> torch.nn.Module:
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 4096))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model


def spec_for(
    seq: int,
    micro_batch: int,
    steps: int,
    zero: int | None = None,
    gc: bool = False,
    performance: dict[str, Any] | None = None,
) -> LoRAFineTuneSpec:
    return LoRAFineTuneSpec.model_validate(
        {
            "model": {"source": "file:///unused", "dtype": "bfloat16"},
            "dataset": {"source": "file:///unused", "maxLength": seq},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": TARGETS},
            "training": {
                "learningRate": 2e-4,
                "maxSteps": steps,
                "microBatchSize": micro_batch,
                "gradientAccumulationSteps": 1,
                "warmup": {"steps": 0},
                "precision": "bf16",
                "gradientCheckpointing": gc,
                "checkpointEverySteps": 10**6,
                "eval": {"everySteps": 10**6},
            },
            "distributed": {"gpusPerNode": 1}
            | ({"deepspeed": {"zeroStage": zero}} if zero is not None else {}),
            "performance": performance or {},
            "output": {"uri": "file:///tmp/bench-out"},
        }
    )


def batches(n: int, micro_batch: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=g)
        out.append(
            {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        )
    return out


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([i[k] for i in items]) for k in items[0]}


class StepTimer(TrainerCallback):
    """Times the steps after WARMUP; records losses and the host's gap between steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.t1 = warmup, 0.0, 0.0
        self.losses: list[float] = []
        self.gaps: list[float] = []
        self._end = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step > self.warmup:
            self.gaps.append(time.perf_counter() - self._end)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == self.warmup:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()
        if state.global_step == state.max_steps:
            torch.cuda.synchronize()
            self.t1 = time.perf_counter()
        self._end = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs and "loss" in logs and state.global_step > self.warmup:
            self.losses.append(float(logs["loss"]))


def train_as_pods(
    model: Any, args: Any, data: list[Any], telemetry: Any, timer: Any, trace: Path
) -> None:
    """Train with the pods' callbacks: telemetry, the trace writer, then TIMER."""
    from lora_trainer.trace import TraceWriter
    from lora_trainer.train import LoRATrainer, TraceCallback

    writer = TraceWriter(trace)
    trainer = LoRATrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=collate,
        callbacks=[telemetry, TraceCallback(writer, telemetry), timer],
    )
    telemetry.attach(trainer)
    trainer.train()
    writer.close()


def run_trainer(a: argparse.Namespace, performance: dict[str, Any]) -> dict[str, Any]:
    from lora_trainer.config import OutputLayout
    from lora_trainer.model import apply_lora
    from lora_trainer.speed import apply_performance
    from lora_trainer.telemetry import TelemetryCollector
    from lora_trainer.train import training_arguments

    spec = spec_for(a.seq, a.micro_batch, a.warmup + a.steps, gc=a.gc, performance=performance)
    model = apply_lora(build_model(a.shape, a.seq), spec.lora, a.gc)  # type: ignore[arg-type]
    plan = apply_performance(model, spec)
    out = Path("/tmp/bench-out")
    args = training_arguments(spec, OutputLayout(out), False, False)
    timer = StepTimer(a.warmup)
    telemetry = TelemetryCollector(spec.monitoring.interval_steps)
    data = batches((a.warmup + a.steps) * a.micro_batch, a.micro_batch, a.seq, a.vocab)
    train_as_pods(model, args, data, telemetry, timer, out / "trace.jsonl")
    return {
        "seconds": timer.t1 - timer.t0,
        "losses": timer.losses,
        "host_gap_ms": 1000 * sum(timer.gaps) / max(len(timer.gaps), 1),
        "plan": plan.to_dict(),
    }


def run_plain(a: argparse.Namespace) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    model: Any = build_model(a.shape, a.seq)
    if a.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS)
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    data = batches((a.warmup + a.steps) * a.micro_batch, a.micro_batch, a.seq, a.vocab)
    losses, t0 = [], 0.0
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        chunk = data[i * a.micro_batch : (i + 1) * a.micro_batch]
        batch = {k: v.cuda(non_blocking=True) for k, v in collate(chunk).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= a.warmup:
            losses.append(loss.detach())
    torch.cuda.synchronize()
    return {
        "seconds": time.perf_counter() - t0,
        "losses": [float(x) for x in losses],
        "host_gap_ms": None,
        "plan": None,
    }


VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "trainer": {},
    "trainer-noopt": {"adapterFastPath": False, "fusedKernels": "none"},
    "trainer-auto": {"checkpointing": "auto"},
    "trainer-compile": {"compile": True},  # fused kernels off: see lora_trainer.speed
}


def versions(*extra: str) -> dict[str, str]:
    """Python, torch, transformers and peft versions, plus each EXTRA distribution installed."""
    found = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", *extra):
        with contextlib.suppress(PackageNotFoundError):
            found[dist.replace("-", "_")] = version(dist)
    return found


def child(a: argparse.Namespace) -> None:
    """One variant in this process: print its row."""
    a.vocab = SHAPES[a.shape]["vocab_size"]
    torch.cuda.reset_peak_memory_stats()
    perf = VARIANTS[a.variant]
    res = run_plain(a) if perf is None else run_trainer(a, perf)
    tps = a.steps * a.micro_batch * a.seq / res["seconds"]
    row = {
        "model": a.shape,
        "seq_len": a.seq,
        "micro_batch": a.micro_batch,
        "gradient_checkpointing": a.gc,
        "variant": a.variant,
        "tokens_per_s": round(tps, 1),
        "mfu": round(tps * flops_per_token(a.shape, a.seq) / PEAK_FLOPS, 4),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "loss_first": round(res["losses"][0], 4),
        "loss_last": round(res["losses"][-1], 4),
        "host_gap_ms": None if res["host_gap_ms"] is None else round(res["host_gap_ms"], 2),
        "plan": res["plan"],
        "gpu": torch.cuda.get_device_name(),
        "versions": versions("liger-kernel"),
    }
    print("ROW " + json.dumps(row), flush=True)


def run_variant(
    shape: str, seq: int, gc: bool, variant: str, a: argparse.Namespace
) -> dict[str, Any]:
    """One variant in a child process: its row, or a row with the error's tail."""
    mb = MICRO_BATCH[(shape, seq)][int(gc)]
    argv = [sys.executable, __file__, "--child", "--shape", shape, "--seq", str(seq)]
    argv += ["--micro-batch", str(mb), "--variant", variant]
    argv += ["--warmup", str(a.warmup), "--steps", str(a.steps)] + (["--gc-on"] if gc else [])
    proc = subprocess.run(argv, capture_output=True, text=True, env=os.environ)
    rows = [x for x in proc.stdout.splitlines() if x.startswith("ROW ")]
    if proc.returncode == 0 and rows:
        row: dict[str, Any] = json.loads(rows[-1][4:])
        return row
    tail = (proc.stdout + proc.stderr)[-1500:]
    return {
        "model": shape,
        "seq_len": seq,
        "micro_batch": mb,
        "gradient_checkpointing": gc,
        "variant": variant,
        "error": f"rc {proc.returncode}: {tail}",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="tinyllama-1.1b,llama2-7b")
    p.add_argument("--seqs", default="512,2048")
    p.add_argument("--gc", default="off,on", help="checkpointing settings to run: off,on")
    p.add_argument("--variants", default="plain,trainer,trainer-noopt,trainer-auto")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    p.add_argument("--micro-batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--gc-on", dest="gc_on", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        a.gc = a.gc_on
        child(a)
        return
    command = " ".join(["python", *sys.argv])
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
    runs = [
        (shape, int(seq), g == "on", variant)
        for shape in a.shapes.split(",")
        for seq in a.seqs.split(",")
        for g in a.gc.split(",")
        for variant in a.variants.split(",")
        if g == "on" or variant != "trainer-auto"  # auto sizes checkpointing: only with it
    ]
    for shape, seq, gc, variant in runs:
        row = run_variant(shape, seq, gc, variant, a) | {"command": command}
        print(json.dumps(row), flush=True)
        if a.out:
            with a.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
