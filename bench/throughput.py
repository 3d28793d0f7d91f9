"""Trainer throughput vs a minimal hand-written PEFT loop, in the same process, on one GPU.

    python bench/trainer_throughput.py --out bench/results/trainer_throughput.jsonl

Model: Llama-2-7B shape from config (random weights), bf16, LoRA r=16 on q,k,v,o,
seq 512, micro-batch 16, gradient accumulation 1, AdamW, clipping 1.0. "trainer" is the code
the pods run (lora_trainer.train: LoRATrainer + training_arguments from a LoRAFineTune spec,
eval off); "plain" is forward/backward/clip/step in a loop. Tokens/s counts every input token
(no padding in the synthetic batches). Each variant: warm-up steps, then timed steps with the
device synchronised at both ends.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from lora_operator.api.spec import LoRAFineTuneSpec
from lora_trainer.config import OutputLayout
from lora_trainer.model import apply_lora
from lora_trainer.train import LoRATrainer, training_arguments

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


def build_model(shape: str, seq: int) -> torch.nn.Module:
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 4096))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model


def spec_for(seq: int, micro_batch: int, steps: int, zero: int | None = None) -> LoRAFineTuneSpec:
    return LoRAFineTuneSpec.model_validate(
        {
            "model": {"source": "file:///unused", "dtype": "bfloat16"},
            "dataset": {"source": "file:///unused", "maxLength": seq},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
            "training": {
                "learningRate": 2e-4,
                "maxSteps": steps,
                "microBatchSize": micro_batch,
                "gradientAccumulationSteps": 1,
                "warmup": {"steps": 0},
                "precision": "bf16",
                "checkpointEverySteps": 10**6,
                "eval": {"everySteps": 10**6},
            },
            "distributed": {"gpusPerNode": 1}
            | ({"deepspeed": {"zeroStage": zero}} if zero is not None else {}),
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
    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.t1 = warmup, 0.0, 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == self.warmup:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()
        if state.global_step == state.max_steps:
            torch.cuda.synchronize()
            self.t1 = time.perf_counter()


def run_trainer(shape: str, seq: int, mb: int, warmup: int, steps: int, gc_on: bool) -> float:
    spec = spec_for(seq, mb, warmup + steps)
    spec.training.gradient_checkpointing = gc_on
    model = apply_lora(build_model(shape, seq), spec.lora, gc_on)  # type: ignore[arg-type]
    args = training_arguments(spec, OutputLayout(Path("/tmp/bench-out")), False, False)
    args.logging_steps = 1
    timer = StepTimer(warmup)
    data = batches((warmup + steps) * mb, mb, seq, SHAPES[shape]["vocab_size"])
    trainer = LoRATrainer(
        model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[timer]
    )
    trainer.train()
    return steps * mb * seq / (timer.t1 - timer.t0)


def run_plain(shape: str, seq: int, mb: int, warmup: int, steps: int, gc_on: bool) -> float:
    spec = spec_for(seq, mb, warmup + steps)
    model = apply_lora(build_model(shape, seq), spec.lora, gc_on)  # type: ignore[arg-type]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    data = batches(mb, mb, seq, SHAPES[shape]["vocab_size"])
    batch = {k: v.cuda() for k, v in collate(data).items()}
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return steps * mb * seq / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama2-7b", choices=list(SHAPES))
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args()
    import peft
    import transformers

    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for repeat in range(a.repeats):
        for variant, fn in (("plain", run_plain), ("trainer", run_trainer)):
            torch.cuda.reset_peak_memory_stats()
            tps = fn(a.shape, a.seq, a.micro_batch, a.warmup, a.steps, a.gradient_checkpointing)
            row = {
                "model": a.shape,
                "seq_len": a.seq,
                "micro_batch": a.micro_batch,
                "gradient_checkpointing": a.gradient_checkpointing,
                "variant": variant,
                "repeat": repeat,
                "tokens_per_s": round(tps, 1),
                "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "gpu": torch.cuda.get_device_name(),
                "versions": versions,
                "command": " ".join(["python", *sys.argv]),
            }
            print(json.dumps(row), flush=True)
            with a.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
