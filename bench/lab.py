"""The failure lab: train the tiny model for real with failures injected, judge each run.

    .venv/bin/python bench/lab.py [--only NAME,...] [--steps N] [--out bench/results]
    .venv/bin/python bench/lab.py --rejudge   # replay the last runs again after a rule change
    make lab                                  # the full lab via pytest (marker lab_full)

Every variant trains the tiny Llama (`python -m lora_trainer.tiny`) in this process through
`lora_trainer.train.run`, then its trace.jsonl (+ data_stats.json) is replayed through the
health engine with the run's own spec (as `lora-operator health replay --spec` does).
Ground truth is the injected mode, not the eval change.

Failures a LoRAFineTune cannot express (the product prevents them) are injected by lab-only
switches: Python-level patches of the trainer's functions, applied here around one run and
undone after it. No spec field reaches them. Failures a spec *can* express (lr 0, a warmup
beyond the run, lr 1e-6, a tiny alpha, r=64 a=1, an eval set from another distribution) are
plain spec patches.

Acceptance (asserted by tests/lab/test_lab.py): every failure mode is flagged at Degraded
or Critical at most DEADLINE_STEPS optimizer steps after its grace period ends, except the
"warning" modes (r=64 a=1, loss on padding), which must be flagged at least at Warning by
their static/data rules; no healthy variant is ever Degraded or Critical.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

from lora_operator.api import constants as c
from lora_operator.api.merge import merge_patch
from lora_operator.health import HealthConfig, replay
from lora_operator.health.engine import worse

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RESULTS = ROOT / "bench" / "results"
DEFAULT_TINY = Path(os.environ.get("LORA_OPERATOR_TINY_DIR", "/tmp/lora-operator/tiny"))
HEALTHY = "healthy"
DEADLINE_STEPS = 50  # a failure must be flagged at most this many steps after grace ends
DEGRADED = "Degraded"  # expected level: Degraded or Critical
WARNING = "Warning"  # expected level: at least Warning
EVAL_FLAT_SAMPLES = 64

# The lab's base spec (on top of examples/quickstart.yaml): short runs, cheap evals.
BASE_PATCH: dict[str, Any] = {
    "lora": {"r": 16, "alpha": 32},
    "training": {
        "learningRate": 1.0e-3,
        "maxSteps": 100,
        "microBatchSize": 8,
        "gradientAccumulationSteps": 1,
        "warmup": {"steps": 10},
        "scheduler": "linear",
        "precision": "fp32",
        "eval": {"everySteps": 25, "maxSamples": 8, "metrics": ["loss"]},
        "checkpointEverySteps": 100000,
    },
    "monitoring": {"intervalSteps": 5},
    "health": {"evaluationIntervalSteps": 5},
}

Injector = Callable[[contextlib.ExitStack, Path], None]


@dataclass(frozen=True)
class Variant:
    """One lab run: a spec patch and, for failures no spec can express, a lab-only switch."""

    name: str
    mode: str  # the injected failure mode, or "healthy"
    patch: dict[str, Any] = field(default_factory=dict)
    inject: Injector | None = None
    expect: str = DEGRADED  # failures: the least severity that must be reached
    note: str = ""

    @property
    def healthy(self) -> bool:
        return self.mode == HEALTHY


# --- lab-only switches -----------------------------------------------------------------------


def _wrap(stack: contextlib.ExitStack, module: Any, name: str, after: Callable[..., Any]) -> None:
    """Patch module.name with a wrapper: after(result, *args) replaces the result."""
    original = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return after(original(*args, **kwargs), *args, **kwargs)

    stack.enter_context(mock.patch.object(module, name, wrapper))


def inject_no_gradient_flow(stack: contextlib.ExitStack, workdir: Path) -> None:
    """Reentrant gradient checkpointing without input grads (lm_head trains via the spec)."""
    from lora_trainer import train

    def after(peft_model: Any, *args: Any, **kwargs: Any) -> Any:
        inner = peft_model.get_base_model()
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        with contextlib.suppress(AttributeError):
            inner.disable_input_require_grads()
        return peft_model

    _wrap(stack, train, "apply_lora", after)


def inject_b_frozen(stack: contextlib.ExitStack, workdir: Path) -> None:
    """lora_B's requires_grad off: B stays at its zero init."""
    from lora_trainer import train

    def after(peft_model: Any, *args: Any, **kwargs: Any) -> Any:
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.requires_grad_(False)
        return peft_model

    _wrap(stack, train, "apply_lora", after)


def inject_fp16_params(stack: contextlib.ExitStack, workdir: Path) -> None:
    """Pure fp16 parameters (model and adapter) under Adam, no autocast, no loss scaling."""
    from lora_trainer import train

    def after(peft_model: Any, *args: Any, **kwargs: Any) -> Any:
        return peft_model.half()

    _wrap(stack, train, "apply_lora", after)


def inject_coupled_l2(stack: contextlib.ExitStack, workdir: Path) -> None:
    """torch.optim.Adam with weight_decay 0.1: L2 added to the gradient (not AdamW's decay)."""
    import torch

    from lora_trainer import train

    def optimizer(spec: Any, model: Any) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=spec.training.learning_rate, weight_decay=0.1)

    stack.enter_context(mock.patch.object(train, "_loraplus_optimizer", optimizer))


def inject_labels_masked(stack: contextlib.ExitStack, workdir: Path) -> None:
    """A masking bug: every training label -100 (the data gate that refuses this is skipped)."""
    from lora_trainer import data as data_module
    from lora_trainer import train

    def after(prepared: Any, spec: Any, tokenizer: Any, *args: Any, **kwargs: Any) -> Any:
        for example in prepared.train:
            example.labels = [data_module.IGNORE_INDEX] * len(example.labels)
        stats = data_module.compute_stats(prepared.train, tokenizer, prepared.stats.malformed)
        return dataclasses.replace(prepared, stats=stats)

    _wrap(stack, train, "load_dataset", after)
    stack.enter_context(mock.patch.object(train, "check_stats", lambda stats: None))


def inject_loss_on_padding(stack: contextlib.ExitStack, workdir: Path) -> None:
    """The field report's preprocessing: pad = eos, padded to maxLength, labels = input_ids."""
    from lora_trainer import data as data_module
    from lora_trainer import train

    def eos_pad(grew: bool, tokenizer: Any, *args: Any, **kwargs: Any) -> bool:
        tokenizer.pad_token = tokenizer.eos_token
        return grew

    def padded(encoded: Any, tokenizer: Any, conversation: Any, max_length: int) -> Any:
        ids = list(encoded.input_ids) + [tokenizer.eos_token_id] * (
            max_length - len(encoded.input_ids)
        )
        return dataclasses.replace(encoded, input_ids=ids, labels=list(ids))

    class CopyLabelsCollator(data_module.Collator):
        def __call__(self, items: Sequence[Any]) -> dict[str, Any]:
            batch = super().__call__(items)
            batch["labels"] = batch["input_ids"].clone()
            return batch

    _wrap(stack, train, "prepare_tokenizer", eos_pad)
    _wrap(stack, data_module, "prepare_tokenizer", eos_pad)
    _wrap(stack, data_module, "encode_conversation", padded)
    stack.enter_context(mock.patch.object(train, "Collator", CopyLabelsCollator))


def eval_other_distribution(workdir: Path) -> Path:
    """An eval set in the base model's casual style (training teaches the ticket style)."""
    from lora_trainer.tiny.corpus import ReplyStyle, generate_conversations

    path = workdir / "eval_casual.jsonl"
    if not path.exists():
        convs = generate_conversations(0, "lab-eval", EVAL_FLAT_SAMPLES, ReplyStyle.CASUAL, 0.15)
        path.write_text("".join(json.dumps({"conversations": c}) + "\n" for c in convs))
    return path


# --- the variants ------------------------------------------------------------------------------

FAILURES: tuple[Variant, ...] = (
    Variant(
        "no-gradient-flow",
        "no_gradient_flow",
        {"lora": {"modulesToSave": ["lm_head"]}},
        inject_no_gradient_flow,
        note="reentrant checkpointing, no input grads; lm_head trains (spec modulesToSave)",
    ),
    Variant("lr-0", "lr_zero", {"training": {"learningRate": 0.0}}),
    Variant(
        "warmup-beyond-total",
        "warmup_beyond_total",
        {"training": {"warmup": {"steps": 20000}}},
        note="warmup 20000 steps in a 100-step run",
    ),
    Variant(
        "lr-1e-6",
        "lr_tiny",
        {"training": {"learningRate": 1.0e-6, "warmup": {"steps": 0}, "scheduler": "constant"}},
    ),
    Variant("alpha-tiny", "alpha_tiny", {"lora": {"r": 8, "alpha": 0.1}}),
    Variant(
        "r64-a1",
        "high_rank_tiny_alpha",
        {"lora": {"r": 64, "alpha": 1.0}},
        expect=WARNING,
        note="alpha/r = 1/64 without rsLoRA",
    ),
    Variant(
        "coupled-l2-decay",
        "coupled_l2_decay",
        inject=inject_coupled_l2,
        note="torch.optim.Adam(weight_decay=0.1)",
    ),
    Variant("b-frozen", "b_frozen", inject=inject_b_frozen),
    Variant("fp16-params", "fp16_pure_params", inject=inject_fp16_params),
    Variant("labels-masked", "no_supervised_tokens", inject=inject_labels_masked),
    Variant(
        "loss-on-padding",
        "loss_on_padding",
        {"dataset": {"maxLength": 192}},
        inject_loss_on_padding,
        expect=WARNING,
        note="pad = eos, padded to maxLength 192, labels = input_ids",
    ),
    Variant(
        "eval-flat",
        "eval_not_improving",
        {"dataset": {"evalSource": "@EVAL_CASUAL@"}},
        note="eval set in the base model's casual style; training teaches the ticket style",
    ),
)

HEALTHY_VARIANTS: tuple[Variant, ...] = (
    Variant("default", HEALTHY),
    Variant("gaussian", HEALTHY, {"lora": {"init": "gaussian"}}),
    Variant("orthogonal", HEALTHY, {"lora": {"init": "orthogonal"}}),
    Variant("pissa", HEALTHY, {"lora": {"init": "pissa"}}),
    Variant("olora", HEALTHY, {"lora": {"init": "olora"}}),
    Variant("loraplus", HEALTHY, {"lora": {"loraPlusLrRatio": 16}}),
    Variant("rslora", HEALTHY, {"lora": {"r": 64, "alpha": 16, "useRslora": True}}),
    Variant(
        "lr-2e-4-warmup",
        HEALTHY,
        {"training": {"learningRate": 2.0e-4, "warmup": {"steps": 20}}},
    ),
    Variant("adamw-decay", HEALTHY, {"training": {"weightDecay": 0.1}}),
)

VARIANTS: tuple[Variant, ...] = FAILURES + HEALTHY_VARIANTS
BY_NAME = {v.name: v for v in VARIANTS}


# --- running and judging -----------------------------------------------------------------------


def spec_body(variant: Variant, tiny: Path, workdir: Path, steps: int) -> dict[str, Any]:
    """The run's LoRAFineTune manifest: quickstart + the lab base + the variant's patch."""
    text = (EXAMPLES / "quickstart.yaml").read_text().replace("/tmp/lora-operator/tiny", str(tiny))
    body: dict[str, Any] = yaml.safe_load(text)
    body["metadata"]["name"] = f"lab-{variant.name}"
    patch = json.loads(json.dumps(variant.patch))
    if "@EVAL_CASUAL@" in json.dumps(patch):
        patch["dataset"]["evalSource"] = f"file://{eval_other_distribution(workdir)}"
    spec = merge_patch(merge_patch(BASE_PATCH, {"training": {"maxSteps": steps}}), patch)
    spec["output"] = {"uri": f"file://{workdir / variant.name}"}
    body["spec"] = merge_patch(body["spec"], spec)
    return body


def run_variant(variant: Variant, tiny: Path, workdir: Path, steps: int) -> dict[str, Any]:
    """Train one variant for real, replay its trace, return its lab.json object."""
    from lora_trainer import train
    from lora_trainer.config import load_spec

    out = workdir / variant.name
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    spec_path = out.with_suffix(".yaml")
    spec_path.write_text(yaml.safe_dump(spec_body(variant, tiny, workdir, steps)))
    _, spec = load_spec(spec_path)
    started = time.monotonic()
    error = None
    with contextlib.ExitStack() as stack:
        if variant.inject is not None:
            variant.inject(stack, workdir)
        try:
            train.run(spec, out)
        except Exception as err:  # a failure mode may crash the trainer: that is a result too
            logging.getLogger(__name__).exception("run %s raised", variant.name)
            error = f"{type(err).__name__}: {err}"
    seconds = time.monotonic() - started
    return judge(variant, spec, out, seconds, error)


def judge(
    variant: Variant, spec: Any, out: Path, seconds: float, error: str | None = None
) -> dict[str, Any]:
    """Replay out/trace.jsonl through the health engine with the run's spec."""
    trace = out / "trace.jsonl"
    records = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    stats_path = out / "data_stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    config = HealthConfig.from_spec(spec.health, spec.training, spec.lora)
    timeline = replay(records, config, stats)
    rules = [
        {
            "rule": e.rule,
            "severity": e.severity,
            "first_firing_step": e.first_firing_step,
            "first_condition_step": e.first_condition_step,
            "firing_at_end": e.firing_at_end,
            "message": e.message,
        }
        for e in timeline.rules
    ]
    evals = [r for r in records if "eval_loss" in r]
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), int | float)]
    eval_first = evals[0]["eval_loss"] if evals else None
    eval_last = evals[-1]["eval_loss"] if evals else None
    result: dict[str, Any] = {
        "name": variant.name,
        "injected_mode": variant.mode,
        "note": variant.note,
        "verdict": timeline.worst_verdict,
        "final_verdict": timeline.verdict,
        "rules": rules,
        "grace_end_step": timeline.grace_end_step,
        "last_step": timeline.last_step,
        "eval_loss_first": eval_first,
        "eval_loss_last": eval_last,
        "eval_change": _diff(eval_last, eval_first),
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "seconds": round(seconds, 1),
        "error": error,
    }
    result |= acceptance(variant, result)
    (out / "lab_result.json").write_text(json.dumps(result, indent=2))
    return result


def rejudge(variant: Variant, workdir: Path, old: dict[str, Any] | None = None) -> dict[str, Any]:
    """Judge a run already trained under workdir again (keeping its seconds and error)."""
    from lora_trainer.config import load_spec

    out = workdir / variant.name
    _, spec = load_spec(out.with_suffix(".yaml"))
    previous = out / "lab_result.json"
    if old is None and previous.exists():
        old = json.loads(previous.read_text())
    old = old or {}
    return judge(variant, spec, out, old.get("seconds", 0.0), old.get("error"))


def _diff(last: Any, first: Any) -> float | None:
    if isinstance(last, int | float) and isinstance(first, int | float):
        return round(float(last) - float(first), 4)
    return None


def acceptance(variant: Variant, result: dict[str, Any]) -> dict[str, Any]:
    """Whether the run meets the lab's acceptance, and the step at which it was flagged."""
    rules = result["rules"]
    if variant.healthy:
        bad = [
            r["rule"] for r in rules if worse(r["severity"], c.VERDICT_DEGRADED) == r["severity"]
        ]
        return {"expected": "no Degraded/Critical", "flagged_step": None, "passed": not bad}
    level = c.VERDICT_DEGRADED if variant.expect == DEGRADED else c.VERDICT_WARNING
    hits = [r for r in rules if worse(r["severity"], level) == r["severity"]]
    step = min((r["first_firing_step"] for r in hits), default=None)
    grace = result["grace_end_step"]
    deadline = None
    if variant.expect == DEGRADED:
        deadline = (grace if grace is not None else 0) + DEADLINE_STEPS
        passed = step is not None and step <= deadline
        expected = f"Degraded/Critical by step {deadline}"
    else:
        passed = step is not None
        expected = "at least Warning"
    first = min(hits, key=lambda r: r["first_firing_step"])["rule"] if hits else None
    return {
        "expected": expected,
        "deadline_step": deadline,
        "flagged_step": step,
        "flagged_by": first,
        "passed": passed,
    }


def run_lab(
    names: Sequence[str],
    steps: int | Mapping[str, int],
    workdir: Path,
    tiny: Path = DEFAULT_TINY,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run the named variants one after the other; steps: for all, or per name."""
    from lora_trainer.tiny import build_tiny_assets

    build_tiny_assets(tiny)
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        n_steps = steps if isinstance(steps, int) else steps[name]
        result = run_variant(BY_NAME[name], tiny, workdir, n_steps)
        log(
            f"{name}: {result['verdict']} flagged_by={result.get('flagged_by')} "
            f"at {result['flagged_step']} grace_end={result['grace_end_step']} "
            f"passed={result['passed']} ({result['seconds']} s)"
        )
        results.append(result)
    return results


# --- reports -----------------------------------------------------------------------------------


def _rule_list(result: dict[str, Any]) -> str:
    return ", ".join(
        f"{r['rule']} ({r['severity']}) @{r['first_firing_step']}" for r in result["rules"]
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.3f}"
    return str(value)


def markdown(results: list[dict[str, Any]], command: str, seconds: float, steps: int) -> str:
    import torch
    import transformers

    passed = sum(r["passed"] for r in results)
    lines = [
        "# Failure lab",
        "",
        "Generated by `bench/lab.py` (do not edit by hand). Each row trained the tiny Llama",
        "for real on CPU, then its trace.jsonl (+ data_stats.json) was replayed through the",
        "health engine with the run's own spec. Ground truth is the injected mode.",
        "",
        f"- command: `{command}`",
        f"- machine: {platform.machine()} CPU, {os.cpu_count()} cores (shared), "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}",
        f"- runs: {len(results)}, {steps} optimizer steps each, micro-batch 8, eval every 25 "
        f"steps, telemetry and health evaluation every 5 steps; total {seconds / 60:.1f} min",
        f"- acceptance: {passed}/{len(results)} runs pass (failures: Degraded/Critical at most "
        f"{DEADLINE_STEPS} steps after grace ends, or at least Warning for the static/data "
        "modes; healthy: never Degraded/Critical)",
        "",
        "| run | injected mode | verdict | flagged by (step) | grace end | deadline "
        "| eval loss change | rules fired (first firing step) | pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        flagged = f"{r['flagged_by']} ({r['flagged_step']})" if r.get("flagged_by") else "-"
        lines.append(
            f"| {r['name']} | {r['injected_mode']} | {r['verdict']} | {flagged} "
            f"| {_fmt(r['grace_end_step'])} | {_fmt(r.get('deadline_step'))} "
            f"| {_fmt(r['eval_change'])} | {_rule_list(r) or '-'} "
            f"| {'yes' if r['passed'] else 'NO'} |"
        )
    lines += ["", "Injected modes:", ""]
    for v in VARIANTS:
        if v.note:
            lines.append(f"- {v.name}: {v.note}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where lab.json/md go")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lora-operator/lab"))
    parser.add_argument("--tiny", type=Path, default=DEFAULT_TINY)
    parser.add_argument(
        "--rejudge",
        action="store_true",
        help="do not train: replay the traces already under --workdir (after a rule change)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = [n for n in args.only.split(",") if n] or [v.name for v in VARIANTS]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(BY_NAME)}")
    started = time.monotonic()
    if args.rejudge:
        path = args.out / "lab.json"
        old = {r["name"]: r for r in json.loads(path.read_text())} if path.exists() else {}
        results = [rejudge(BY_NAME[n], args.workdir, old.get(n)) for n in names]
    else:
        results = run_lab(names, args.steps, args.workdir, args.tiny)
    seconds = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lab.json").write_text(json.dumps(results, indent=2) + "\n")
    command = " ".join(["python", "bench/lab.py", *(argv if argv is not None else sys.argv[1:])])
    (args.out / "lab.md").write_text(markdown(results, command, seconds, args.steps))
    failed = [r["name"] for r in results if not r["passed"]]
    print(f"{len(results) - len(failed)}/{len(results)} pass; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
