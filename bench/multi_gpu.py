"""Multi-process verification: 1 rank vs N ranks on the same global batch (issue 12).

    # the multi-GPU machine (a random-weight Llama-2-7B shape, bf16, NCCL)
    python bench/multi_gpu.py --device cuda --world-sizes 1,2,8 --zero-stages 0,2,3 \
        --shape llama2-7b --overhead --out bench/results/multi_gpu_h200.jsonl
    # 2 CPU cores, gloo, the tiny model
    .venv/bin/python bench/multi_gpu.py --device cpu --world-sizes 1,2 --zero-stages 0,2,3 \
        --out bench/results/multi_gpu_cpu.jsonl

Each (zero stage, LoRA dropout, world size) is one real `python -m lora_trainer launch` run
with the settings of examples/collapse-demo.yaml (lr 1e-6, no warm-up, telemetry and health
every 5 steps), cut to --steps, the global batch kept (micro-batch = global batch / world
size); stage 0 is plain DDP. Dropout "demo" is the demo's own (the spec default); dropout 0
is the exact variant: ranks draw other dropout masks than one process does, so per-module
gradients can only agree exactly without dropout. Rows (JSON lines, each with the command,
machine and versions):

- "run": tokens/s per process (trace tokens over summed step_time), wall time, the first
  Degraded/Critical verdict and its rules, and the scrape check: prometheus_client's
  multiprocess sum of the per-rank counters (what local rank 0 serves) against each rank's
  own file and against steps x global batch.
- "compare" (each run against the first world size of its stage, and against the first
  world size of the first stage): (a) same final verdict, first firing step and rules;
  (b) per-module gradient norms (trace `lora[].grad_norm`, every telemetry step) within
  --rtol; loss and total grad norm differences.
- "overhead" (--overhead): the same run with telemetry every step vs every 10 steps
  (the default), mean step_time ratio - 1 (steps after the first 5).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from throughput import SHAPES as THROUGHPUT_SHAPES
from throughput import versions

from lora_operator.local.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "collapse-demo.yaml"
TINY_DEFAULT = "/tmp/lora-operator/tiny"
STOP = ("Degraded", "Critical")
# NVLink multicast stays off on the lent GPU machines (NCCL NVLS, symmetric memory, NVSHMEM).
NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
# bench/throughput.py's shapes without their vocabulary (these use the tiny tokenizer's);
# --shape tiny is the generated tiny model itself.
SHAPES: dict[str, dict[str, Any]] = {
    name: {k: v for k, v in shape.items() if k != "vocab_size"}
    for name, shape in THROUGHPUT_SHAPES.items()
    if name in ("llama2-7b", "tinyllama-1.1b")
}


@dataclass(frozen=True)
class Run:
    """One launch: its settings and where it wrote."""

    world_size: int
    zero: int
    interval: int
    dropout: float | None  # None: the demo's (the spec default, 0.05)
    out: Path
    prom: Path
    wall_s: float
    command: list[str]


def shape_model(shape: str, tiny: Path, dest: Path) -> Path:
    """A random-weight Llama of SHAPE (bf16) with the tiny tokenizer, written once to DEST."""
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tiny / "model"))
    cfg = LlamaConfig(
        **SHAPES[shape],
        vocab_size=32000,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model: Any = LlamaForCausalLM(cfg)
        model = model.to(torch.bfloat16)
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    return dest


def build_spec(
    a: argparse.Namespace, model: Path, ws: int, zero: int, interval: int, dropout: float | None
) -> Any:
    """The collapse demo's spec for one run: same global batch, cut to a.steps."""
    body: Any = yaml.safe_load(DEMO.read_text())
    text = json.dumps(body).replace(TINY_DEFAULT, str(a.tiny_dir))
    spec = json.loads(text)["spec"]
    if a.global_batch % ws:
        raise SystemExit(f"--global-batch {a.global_batch} is not divisible by {ws} ranks")
    spec["model"]["source"] = f"file://{model}"
    t = spec["training"]
    t |= {"maxSteps": a.steps, "microBatchSize": a.global_batch // ws}
    t |= {"gradientAccumulationSteps": 1, "checkpointEverySteps": 10**6}
    t["eval"]["everySteps"] = 10**6  # the base model's eval at step 0 and the final one only
    if a.shape != "tiny":  # the random-weight shapes are bf16
        spec["model"]["dtype"], t["precision"] = "bfloat16", "bf16"
    if a.device == "cuda":  # one process per GPU (processesPerNode is for cpu only)
        spec["distributed"] = {"device": "cuda", "gpusPerNode": ws}
    else:
        spec["distributed"] = {"device": "cpu", "gpusPerNode": 0, "processesPerNode": ws}
    if zero:
        spec["distributed"]["deepspeed"] = {"zeroStage": zero}
    spec["monitoring"] = {"intervalSteps": interval, "port": free_port()}
    if dropout is not None:
        spec["lora"]["dropout"] = dropout
    return spec


def launch(
    a: argparse.Namespace, model: Path, ws: int, zero: int, interval: int, dropout: float | None
) -> Run:
    """One `lora_trainer launch` run in its own directory; raises when it fails."""
    run_dir = a.workdir / f"ws{ws}-zero{zero}-every{interval}-dropout{dropout}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec_path = run_dir / "spec.yaml"
    body: dict[str, Any] = {"apiVersion": "lora-operator.dev/v1alpha1", "kind": "LoRAFineTune"}
    body |= {"metadata": {"name": f"mgpu-ws{ws}-z{zero}"}}
    body["spec"] = build_spec(a, model, ws, zero, interval, dropout)
    body["spec"]["output"] = {"uri": f"file://{run_dir / 'out'}"}
    spec_path.write_text(yaml.safe_dump(body))
    cmd = [sys.executable, "-m", "lora_trainer", "launch", "--nproc-per-node", str(ws)]
    cmd += ["--master-port", str(free_port()), "--", "--spec", str(spec_path)]
    cmd += ["--output", str(run_dir / "out")]
    env = os.environ | NO_MULTICAST | {"PROMETHEUS_MULTIPROC_DIR": str(run_dir / "prom")}
    started = time.monotonic()
    with (run_dir / "log.txt").open("w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        tail = (run_dir / "log.txt").read_text()[-3000:]
        raise SystemExit(f"run ws={ws} zero={zero} exited {proc.returncode}:\n{tail}")
    return Run(ws, zero, interval, dropout, run_dir / "out", run_dir / "prom", wall, cmd)


def read_trace(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "trace.jsonl").read_text().splitlines() if x]


def training_records(trace: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in trace if "loss" in r and "health" not in r]


def first_firing(trace: list[dict[str, Any]]) -> dict[str, Any]:
    """The first Degraded/Critical verdict record (step, verdict, rules), and the last one."""
    verdicts = [r["health"] for r in trace if "health" in r]
    first = next((h for h in verdicts if h["verdict"] in STOP), None)
    return {
        "first_firing_step": first["step"] if first else None,
        "first_firing_verdict": first["verdict"] if first else None,
        "first_firing_rules": [x["rule"] for x in first["rules"]] if first else [],
        "final_verdict": verdicts[-1]["verdict"] if verdicts else None,
    }


def throughput(records: list[dict[str, Any]], ws: int, skip: int = 5) -> dict[str, Any]:
    """Tokens/s over the steps after the first SKIP (global tokens / summed step_time)."""
    timed = records[skip:]
    seconds = sum(r["step_time"] for r in timed)
    tokens = timed[-1]["tokens"] - records[skip - 1]["tokens"]
    return {
        "tokens_per_s": round(tokens / seconds, 1),
        "tokens_per_s_per_process": round(tokens / seconds / ws, 1),
        "step_time_median_s": round(statistics.median(r["step_time"] for r in timed), 5),
        "step_time_mean_s": round(seconds / len(timed), 5),
        "timed_steps": len(timed),
    }


def scrape_check(run: Run, steps: int, global_batch: int) -> dict[str, Any]:
    """Counters summed across the ranks' files (the scrape) vs each rank and the expected rows."""
    from prometheus_client.multiprocess import MultiProcessCollector

    def totals(files: list[str]) -> dict[str, float]:
        found: dict[str, float] = {}
        merged = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        for metric in merged:
            for s in metric.samples:
                if s.name in ("lora_trainer_samples_total", "lora_trainer_tokens_total"):
                    found[s.name] = found.get(s.name, 0.0) + s.value
        return found

    files = sorted(str(p) for p in run.prom.glob("counter_*.db"))
    scrape = totals(files)
    per_rank = [totals([f]) for f in files]
    samples = "lora_trainer_samples_total"
    tokens = "lora_trainer_tokens_total"
    ok = (
        len(per_rank) == run.world_size
        and scrape.get(samples) == steps * global_batch
        and all(r.get(samples) == steps * global_batch // run.world_size for r in per_rank)
        and scrape.get(tokens) == sum(r.get(tokens, 0.0) for r in per_rank)
    )
    return {
        "scrape_samples_total": scrape.get(samples),
        "scrape_tokens_total": scrape.get(tokens),
        "per_rank_samples_total": [r.get(samples) for r in per_rank],
        "per_rank_tokens_total": [r.get(tokens) for r in per_rank],
        "expected_samples_total": steps * global_batch,
        "counters_ok": ok,
    }


def grad_norms(trace: list[dict[str, Any]]) -> dict[tuple[int, int, str, str], float]:
    """(step, layer, module, matrix) -> lora[].grad_norm of every telemetry record."""
    return {
        (r["step"], m["layer"], m["module"], m["matrix"]): m["grad_norm"]
        for r in training_records(trace)
        for m in r.get("lora", [])
        if isinstance(m.get("grad_norm"), int | float)
    }


def rel_diff(x: float, ref: float, floor: float = 1e-12) -> float:
    return abs(x - ref) / max(abs(ref), floor)


def compare_grads(ref: list[dict[str, Any]], run: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-module grad norms of RUN against REF: relative differences, step 1 and overall.

    Norms that are 0 in the reference (lora_A at step 1, B = 0) are compared absolutely."""
    g_ref, g_run = grad_norms(ref), grad_norms(run)
    keys = sorted(set(g_ref) & set(g_run))
    nonzero = [k for k in keys if g_ref[k] > 0]
    diffs = [rel_diff(g_run[k], g_ref[k]) for k in nonzero]
    first = [rel_diff(g_run[k], g_ref[k]) for k in nonzero if k[0] == 1]
    zeros = [abs(g_run[k]) for k in keys if g_ref[k] == 0]
    loss_ref = {r["step"]: r for r in training_records(ref)}
    both = [(r, loss_ref[r["step"]]) for r in training_records(run) if r["step"] in loss_ref]
    return {
        "grad_norm_values": len(keys),
        "grad_norm_only_in_one": len(set(g_ref) ^ set(g_run)),
        "telemetry_steps": sorted({k[0] for k in keys}),
        "grad_norm_rel_diff_step1_max": max(first, default=None),
        "grad_norm_rel_diff_max": max(diffs, default=None),
        "grad_norm_rel_diff_median": statistics.median(diffs) if diffs else None,
        "grad_norm_zero_in_ref_abs_max": max(zeros, default=None),
        "total_grad_norm_rel_diff_max": max(
            (rel_diff(r["grad_norm"], q["grad_norm"]) for r, q in both), default=None
        ),
        "loss_abs_diff_max": max((abs(r["loss"] - q["loss"]) for r, q in both), default=None),
        "tokens_equal": [r["tokens"] for r, _ in both] == [q["tokens"] for _, q in both],
    }


def compare(ref: Run, run: Run, rtol: float) -> dict[str, Any]:
    """(a) the health verdict and first firing step, (b) per-module grad norms, RUN vs REF."""
    t_ref, t_run = read_trace(ref.out), read_trace(run.out)
    h_ref, h_run = first_firing(t_ref), first_firing(t_run)
    grads = compare_grads(t_ref, t_run)
    worst = grads["grad_norm_rel_diff_max"]
    return {
        "kind": "compare",
        "zero_stage": run.zero,
        "lora_dropout": dropout_of(run),
        "world_size": run.world_size,
        "reference_world_size": ref.world_size,
        "reference_zero_stage": ref.zero,
        "health_ref": h_ref,
        "health": h_run,
        "same_health": h_ref == h_run,
        **grads,
        "rtol": rtol,
        "grad_norms_within_rtol": worst is not None and worst <= rtol,
    }


def dropout_of(run: Run) -> float:
    from lora_operator.api.spec import LoRASpec

    default: float = LoRASpec.model_fields["dropout"].default
    return default if run.dropout is None else run.dropout


def run_row(run: Run, a: argparse.Namespace) -> dict[str, Any]:
    trace = read_trace(run.out)
    summary = json.loads((run.out / "summary.json").read_text())
    return {
        "kind": "run",
        "zero_stage": run.zero,
        "lora_dropout": dropout_of(run),
        "world_size": run.world_size,
        "micro_batch": a.global_batch // run.world_size,
        "global_batch": a.global_batch,
        "telemetry_interval": run.interval,
        "steps": summary["steps"],
        "wall_s": round(run.wall_s, 1),
        "final_eval_loss": summary["final"].get("eval_loss"),
        **throughput(training_records(trace), run.world_size),
        **first_firing(trace),
        **scrape_check(run, summary["steps"], a.global_batch),
        "launch_command": shlex.join(run.command),
    }


def overhead_row(every: Run, default: Run) -> dict[str, Any]:
    """Mean step_time with telemetry every step over that at the default interval (a mean:
    a median would skip the collecting steps at the default interval)."""
    t_every = throughput(training_records(read_trace(every.out)), every.world_size)
    t_default = throughput(training_records(read_trace(default.out)), default.world_size)
    ratio = t_every["step_time_mean_s"] / t_default["step_time_mean_s"]
    return {
        "kind": "overhead",
        "zero_stage": every.zero,
        "lora_dropout": dropout_of(every),
        "world_size": every.world_size,
        "step_time_mean_s_every_step": t_every["step_time_mean_s"],
        "step_time_mean_s_every_10": t_default["step_time_mean_s"],
        "overhead_every_step_vs_10": round(ratio - 1, 5),
    }


def machine(a: argparse.Namespace) -> dict[str, Any]:
    """Device, its model and count, and the versions that matter."""
    import torch

    if a.device == "cuda":
        model, count = torch.cuda.get_device_name(), torch.cuda.device_count()
    else:
        model, count = _cpu_model(), os.cpu_count() or 0
    return {
        "device": a.device,
        "backend": "nccl" if a.device == "cuda" else "gloo",
        "device_model": model,
        "device_count": count,
        "shape": a.shape,
        "versions": versions("deepspeed"),
        "command": shlex.join(["python", *sys.argv]),
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--world-sizes", default="1,2", help="comma-separated; 1 is the reference")
    p.add_argument("--zero-stages", default="0,2,3", help="0 = DDP without DeepSpeed")
    p.add_argument("--shape", default="tiny", choices=("tiny", *SHAPES))
    p.add_argument("--steps", type=int, default=70, help="maxSteps of every run")
    p.add_argument("--global-batch", type=int, default=8, help="the collapse demo's 8 x 1")
    p.add_argument(
        "--dropouts",
        default="demo,0",
        help="LoRA dropout variants ('demo': the spec default); ranks draw other dropout masks "
        "than one process, so per-module gradients agree only without dropout",
    )
    p.add_argument("--rtol", type=float, default=1e-3, help="per-module grad norm tolerance")
    p.add_argument("--overhead", action="store_true", help="also telemetry every step vs 10")
    p.add_argument("--tiny-dir", type=Path, default=Path(TINY_DEFAULT))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lora-operator/bench-multi-gpu"))
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def emit(row: dict[str, Any], out: Path, info: dict[str, Any]) -> None:
    row = row | info | {"time": round(time.time(), 1)}
    print(json.dumps(row), flush=True)
    with out.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def main() -> None:
    a = parse_args()
    a.tiny_dir = a.tiny_dir.resolve()
    sizes = [int(x) for x in a.world_sizes.split(",")]
    stages = [int(x) for x in a.zero_stages.split(",")]
    if a.shape == "tiny":
        model = a.tiny_dir / "model"
    else:
        model = shape_model(a.shape, a.tiny_dir, a.workdir / f"model-{a.shape}")
    info = machine(a)
    dropouts = [None if x == "demo" else float(x) for x in a.dropouts.split(",")]
    first: dict[float | None, Run] = {}  # the first stage's reference run, per dropout
    for zero in stages:
        for dropout in dropouts:
            runs: dict[int, Run] = {}
            for ws in sizes:
                runs[ws] = launch(a, model, ws, zero, 5, dropout)  # the demo's interval
                emit(run_row(runs[ws], a), a.out, info)
                first.setdefault(dropout, runs[ws])
                refs = [runs[sizes[0]], first[dropout]]
                for i, ref in enumerate(refs):
                    if ref is not runs[ws] and ref not in refs[:i]:
                        emit(compare(ref, runs[ws], a.rtol), a.out, info)
        if a.overhead:
            for ws in sizes:
                every = launch(a, model, ws, zero, 1, dropouts[-1])
                default = launch(a, model, ws, zero, 10, dropouts[-1])
                emit(overhead_row(every, default), a.out, info)


if __name__ == "__main__":
    main()
