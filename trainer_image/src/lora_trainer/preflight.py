"""Pre-flight: check a spec on the real model and data before a long run (docs/preflight.md).

`run_preflight(spec)` loads the tokenizer, the data and the base model exactly as `train.run`
does, then checks, in order:

1. the data statistics and the health package's data and static rules (DataQuality,
   StaticConfig, with the thresholds, severities and switches of spec.health);
2. the adapter: adapted modules against layers x targetModules, trainable parameters,
   requires_grad of every lora_A and lora_B;
3. `steps` instrumented optimizer steps on real batches (the spec's collator, optimizer,
   precision and clipping, at the peak learning rate): finite loss and parameters,
   supervised tokens in every batch, a gradient reaching every lora_B at step 1 and every
   lora_A by step 2.

Nothing is written. The verdict is the worst status; exit 0 pass, 10 warn, 20 fail, as for
`lora-operator health replay`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lora_operator.api import constants as c
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.health import HealthConfig
from lora_operator.health.preflight import (
    EXIT_CODES,
    FAIL,
    PASS,
    RANK,
    WARN,
    render_table,
    rule_check,
)
from lora_operator.health.window import Window
from lora_trainer.config import SpecError, resolve_uri
from lora_trainer.data import (
    IGNORE_INDEX,
    Collator,
    DataError,
    PreparedData,
    load_dataset,
    prepare_tokenizer,
)
from lora_trainer.model import apply_lora, load_base_model, load_tokenizer
from lora_trainer.speed import apply_performance
from lora_trainer.telemetry.collect import Tracked, find_lora

log = logging.getLogger(__name__)

# A truncated sample lost the end of its first exchange (whole later turns are dropped
# instead, see data._fit); more than this fraction of them means maxLength is too small.
TRUNCATION_WARN = 0.05
SHOWN = 3  # modules named in a message


@dataclass(frozen=True)
class Check:
    """One row of the table: what was measured, what was expected, and the fix."""

    name: str
    status: str
    measured: str
    expected: str
    message: str = ""


@dataclass
class PreflightReport:
    """The checks in order, plus the checks that could not run and why."""

    spec_name: str = ""
    checks: list[Check] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, status: str, measured: str, expected: str, message: str = "") -> None:
        self.checks.append(
            Check(name, status, measured, expected, "" if status == PASS else message)
        )

    @property
    def verdict(self) -> str:
        worst = PASS
        for check in self.checks:
            if RANK[check.status] > RANK[worst]:
                worst = check.status
        return worst

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.spec_name,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "checks": [asdict(check) for check in self.checks],
            "skipped": list(self.skipped),
            "notes": list(self.notes),
        }

    def table(self) -> str:
        return render_table(self.to_dict())


# --- the health package's static and data rules ------------------------------------------


def rule_checks(
    report: PreflightReport,
    spec: LoRAFineTuneSpec,
    total_steps: int | None,
    data_stats: Mapping[str, Any] | None,
) -> None:
    """StaticConfig (and DataQuality when there are statistics) as spec.health configures them."""
    config = HealthConfig.from_spec(spec.health, spec.training, spec.lora, total_steps)
    window = Window(step=0, config=config, data_stats=data_stats)
    names = [c.RULE_STATIC_CONFIG] + ([c.RULE_DATA_QUALITY] if data_stats is not None else [])
    for name in names:
        report.add(**rule_check(name, config, window))


# --- entry point ---------------------------------------------------------------------------


def run_preflight(spec: LoRAFineTuneSpec, steps: int = 2, name: str = "") -> PreflightReport:
    """All checks of docs/preflight.md on the spec's real model and data; never trains to disk."""
    report = PreflightReport(spec_name=name)
    if not spec.health.preflight.enabled:
        report.notes.append("spec.health.preflight.enabled is false; run on request anyway")
    if spec.distributed.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.manual_seed(spec.training.seed)
    try:
        tokenizer = load_tokenizer(spec.model)
    except (SpecError, OSError, ValueError) as err:
        report.add("model: tokenizer", FAIL, "cannot load", spec.model.source, str(err))
        rule_checks(report, spec, spec.training.max_steps, None)
        report.skipped.append("data, adapter and instrumented steps: no tokenizer")
        return report
    try:
        grew = prepare_tokenizer(tokenizer, spec.dataset.chat_template)
        data = load_dataset(spec.dataset, tokenizer, resolve_uri)
    except (SpecError, DataError, OSError) as err:
        report.add("data: load", FAIL, "cannot load", "readable data", str(err))
        rule_checks(report, spec, spec.training.max_steps, None)
        report.skipped.append("model and instrumented steps: the data could not be loaded")
        return report
    stats = data.stats.to_dict()
    _data_checks(report, stats, spec)
    rule_checks(report, spec, total_steps(spec, len(data.train)), stats)
    try:
        base = load_base_model(spec.model, len(tokenizer) if grew else None)
    except (SpecError, OSError, ValueError) as err:
        report.add("model: load", FAIL, "cannot load", spec.model.source, str(err))
        report.skipped.append("adapter and instrumented steps: the model could not be loaded")
        return report
    if not _adapted_modules_expected(report, base, spec):
        report.skipped.append("adapter and instrumented steps: no adapter to check")
        return report
    model = apply_lora(base, spec.lora, spec.training.gradient_checkpointing)
    tracked = find_lora(model)
    _adapter_checks(report, model, tracked, spec)
    _performance_check(report, model, spec)
    if not data.train:
        report.skipped.append("instrumented steps: no training sample has a supervised token")
        return report
    if steps < 1:
        report.skipped.append("instrumented steps: --preflight-steps 0")
        return report
    _instrumented_steps(report, model, tracked, data, tokenizer.pad_token_id, spec, steps)
    return report


def total_steps(spec: LoRAFineTuneSpec, train_samples: int) -> int | None:
    """Optimizer steps of the run (as train._health_monitor computes them for epochs)."""
    t, d = spec.training, spec.distributed
    if t.max_steps is not None:
        return t.max_steps
    if t.epochs is None:
        return None
    per_node = d.gpus_per_node if d.device == "cuda" else (d.processes_per_node or 1)
    per_step = t.micro_batch_size * t.gradient_accumulation_steps * d.nodes * max(per_node, 1)
    return math.ceil(math.ceil(train_samples / per_step) * t.epochs)


# --- data ----------------------------------------------------------------------------------


def _data_checks(report: PreflightReport, stats: Mapping[str, Any], spec: LoRAFineTuneSpec) -> None:
    samples, malformed = int(stats["samples"]), int(stats["malformed"])
    report.add(
        "data: samples",
        WARN if malformed else PASS,
        f"{samples} encoded, {malformed} malformed",
        "> 0 encoded, 0 malformed",
        f"{malformed} malformed samples were skipped; fix them in {spec.dataset.source}",
    )
    supervised = int(stats["supervised_tokens"])
    report.add(
        "data: supervised tokens",
        PASS if supervised else FAIL,
        f"{supervised} ({stats['supervised_fraction']:.1%} of {stats['tokens']} tokens)",
        "> 0",
        "no token carries a label: check that the conversations have assistant turns and "
        "that spec.dataset.maxLength leaves room for them",
    )
    without = int(stats["samples_without_supervision"])
    report.add(
        "data: samples without supervision",
        WARN if without else PASS,
        f"{without} of {samples}",
        "0",
        f"{without} samples have no supervised token (assistant turn cut off?) and are not "
        "trained on; raise spec.dataset.maxLength or shorten their prompts",
    )
    rate = float(stats["truncation_rate"])
    report.add(
        "data: truncation",
        WARN if rate > TRUNCATION_WARN else PASS,
        f"{rate:.1%} ({stats['truncated_samples']} samples; "
        f"{stats['samples_with_dropped_turns']} lost later turns)",
        f"<= {TRUNCATION_WARN:.0%}",
        f"{rate:.1%} of the samples are cut inside their first exchange; raise "
        f"spec.dataset.maxLength (now {spec.dataset.max_length})",
    )


# --- the adapter ---------------------------------------------------------------------------


def _performance_check(report: PreflightReport, model: Any, spec: LoRAFineTuneSpec) -> None:
    """spec.performance applied as the run will (the steps below then use it too)."""
    try:
        plan = apply_performance(model, spec)
    except SpecError as err:
        report.add("performance", FAIL, "cannot apply", "spec.performance", str(err))
        return
    measured = (
        f"adapter fast path {'on' if plan.adapter_fast_path else 'off'}; fused kernels "
        f"{plan.kernels_note}; checkpointing {plan.checkpoint_note}"
    )
    report.add("performance", PASS, measured, "spec.performance applied")


def _adapted_modules_expected(
    report: PreflightReport, model: torch.nn.Module, spec: LoRAFineTuneSpec
) -> bool:
    """Per target, the linear modules it matches (peft's suffix match) vs one per layer."""
    n_layers = int(getattr(getattr(model, "config", None), "num_hidden_layers", 1) or 1)
    targets = list(spec.lora.target_modules)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    counts = {t: sum(1 for n in linear if n == t or n.endswith("." + t)) for t in targets}
    expected = n_layers * len(targets)
    missing = [t for t, n in counts.items() if n == 0]
    short = [t for t, n in counts.items() if 0 < n < n_layers]
    measured = ", ".join(f"{t} x{n}" for t, n in counts.items())
    want = f"{expected} ({n_layers} layers x {len(targets)} targets)"
    if missing or short:
        known = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear} - {"lm_head"}))
        what = (
            f"{', '.join(map(repr, missing))} match no linear module"
            if missing
            else f"{', '.join(map(repr, short))} match fewer modules than the {n_layers} layers"
        )
        report.add(
            "adapter: adapted modules",
            FAIL,
            f"{sum(counts.values())} ({measured})",
            want,
            f"spec.lora.targetModules: {what}; this model's linear modules are: {known}",
        )
        return False
    report.notes.append(f"targets: {measured}")
    return True


def _adapter_checks(
    report: PreflightReport, model: torch.nn.Module, tracked: Tracked, spec: LoRAFineTuneSpec
) -> None:
    n_layers = int(getattr(getattr(model, "config", None), "num_hidden_layers", 1) or 1)
    expected = n_layers * len(spec.lora.target_modules)
    adapted = len(tracked.pairs)
    status = PASS if adapted == expected else (FAIL if adapted < expected else WARN)
    report.add(
        "adapter: adapted modules",
        status,
        str(adapted),
        f"{expected} ({n_layers} layers x {len(spec.lora.target_modules)} targets)",
        "spec.lora.targetModules: "
        + (
            "fewer modules adapted than layers x targets (a partial match)"
            if adapted < expected
            else "a target name matches more than one module per layer; use a longer suffix"
        ),
    )
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    lora = sum(p.numel() for p in tracked.params)
    extra = sum(p.numel() for p in tracked.extra)
    expected_extra = bool(spec.lora.modules_to_save) or spec.lora.use_dora
    status = FAIL if trainable == 0 else (WARN if extra and not expected_extra else PASS)
    report.add(
        "adapter: trainable parameters",
        status,
        f"{trainable} of {total} ({100.0 * trainable / max(total, 1):.3f}%); "
        f"{extra} outside lora_A/B",
        f"LoRA A/B {lora}"
        + (" + modulesToSave/DoRA" if expected_extra else ", nothing else trainable"),
        "nothing is trainable"
        if trainable == 0
        else f"{extra} trainable parameters outside the adapter although spec.lora has no "
        "modulesToSave: something unfroze base weights",
    )
    for matrix, frozen_status, fix in (
        ("A", WARN, "lora_A frozen: only LoRA-FA does that on purpose (LoRAAGradientNone)"),
        ("B", FAIL, "lora_B frozen: it stays at its init and the adapter cannot learn"),
    ):
        frozen = [
            tracked.names[i]
            for i, key in enumerate(tracked.keys)
            if key.matrix == matrix and not tracked.params[i].requires_grad
        ]
        count = sum(1 for key in tracked.keys if key.matrix == matrix)
        report.add(
            f"adapter: lora_{matrix} requires_grad",
            frozen_status if frozen else PASS,
            f"{count - len(frozen)}/{count}",
            f"{count}/{count}",
            f"{fix}: {', '.join(frozen[:SHOWN])}",
        )


# --- instrumented steps --------------------------------------------------------------------


@dataclass
class _Step:
    step: int
    loss: float
    supervised: int
    b_was_zero: bool  # every lora_B exactly 0 before this step (the default init's start)
    a_none: list[str] = field(default_factory=list)
    b_none: list[str] = field(default_factory=list)
    a_zero: list[str] = field(default_factory=list)
    b_zero: list[str] = field(default_factory=list)
    skipped_by_scaler: bool = False


def _optimizer(model: Any, spec: LoRAFineTuneSpec) -> torch.optim.Optimizer:
    t = spec.training
    if spec.lora.lora_plus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        optimizer: torch.optim.Optimizer = create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=t.learning_rate,
            loraplus_lr_ratio=spec.lora.lora_plus_lr_ratio,
            weight_decay=t.weight_decay,
        )
        return optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def _autocast(device: torch.device, precision: str) -> Callable[[], AbstractContextManager[Any]]:
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16" and device.type == "cuda":
        return lambda: torch.autocast(device.type, dtype=torch.float16)
    return nullcontext


def _instrumented_steps(
    report: PreflightReport,
    model: torch.nn.Module,
    tracked: Tracked,
    data: PreparedData,
    pad_id: int | None,
    spec: LoRAFineTuneSpec,
    steps: int,
) -> None:
    t = spec.training
    cuda = spec.distributed.device == "cuda" and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model.to(device)
    model.train()
    optimizer = _optimizer(model, spec)
    scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" and cuda else None
    autocast = _autocast(device, t.precision)
    collate = Collator(pad_id)
    size = t.micro_batch_size
    done: list[_Step] = []
    for step in range(1, steps + 1):
        rows = [data.train[(i + (step - 1) * size) % len(data.train)] for i in range(size)]
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        b_was_zero = all(not bool(tracked.params[b].detach().any()) for _, b, _ in tracked.pairs)
        with autocast():
            loss = model(**batch).loss
        record = _Step(step, float(loss.detach()), supervised, b_was_zero)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        _read_grads(record, tracked)
        if t.max_grad_norm > 0:
            params = [p for p in model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        if scaler is not None:
            before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            record.skipped_by_scaler = scaler.get_scale() < before
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done.append(record)
    _step_checks(report, done, tracked, spec)


def _read_grads(record: _Step, tracked: Tracked) -> None:
    for name, key, param in zip(tracked.names, tracked.keys, tracked.params, strict=True):
        short = name.removesuffix(f".lora_{key.matrix}")
        grad = param.grad
        if grad is None:
            (record.a_none if key.matrix == "A" else record.b_none).append(short)
        elif not bool(grad.detach().any()):
            (record.a_zero if key.matrix == "A" else record.b_zero).append(short)


def _names(modules: list[str]) -> str:
    more = f" and {len(modules) - SHOWN} more" if len(modules) > SHOWN else ""
    return ", ".join(modules[:SHOWN]) + more


def _step_checks(
    report: PreflightReport, done: list[_Step], tracked: Tracked, spec: LoRAFineTuneSpec
) -> None:
    losses = ", ".join(f"step {s.step} {s.loss:.4g}" for s in done)
    bad = [s.step for s in done if not math.isfinite(s.loss)]
    report.add(
        "steps: loss finite",
        FAIL if bad else PASS,
        losses,
        "finite",
        f"non-finite loss at step(s) {bad} (NonFinite): lower the learning rate, use bf16 "
        "rather than fp16, check the data",
    )
    nonfinite = [
        tracked.names[i] for i, p in enumerate(tracked.params) if not bool(p.isfinite().all())
    ]
    report.add(
        "steps: LoRA parameters finite",
        FAIL if nonfinite else PASS,
        f"{len(tracked.params) - len(nonfinite)}/{len(tracked.params)} finite",
        f"{len(tracked.params)}/{len(tracked.params)}",
        f"non-finite after the optimizer step (NonFinite): {_names(nonfinite)}",
    )
    empty = [s.step for s in done if s.supervised == 0]
    report.add(
        "steps: supervised tokens per batch",
        FAIL if empty else PASS,
        f"min {min(s.supervised for s in done)} over {len(done)} batch(es)",
        "> 0 in every batch",
        f"batch(es) of step(s) {empty} have no supervised token (NoSupervisedTokens): "
        "the loss is NaN there; check the labels and spec.dataset.maxLength",
    )
    modules = len(tracked.pairs)
    first = done[0]
    if first.b_none:
        b_status, b_fix = (
            FAIL,
            (
                f"NoGradientFlow: lora_B grad is None in {_names(first.b_none)}; with gradient "
                "checkpointing, keep the operator's non-reentrant checkpointing and input grads"
            ),
        )
    elif first.b_zero:
        b_status, b_fix = FAIL, f"lora_B grad exactly 0 at step 1 in {_names(first.b_zero)}"
    else:
        b_status, b_fix = PASS, ""
    report.add(
        "gradient flow: lora_B",
        b_status,
        f"step 1: {modules - len(first.b_none) - len(first.b_zero)}/{modules} non-zero",
        f"{modules}/{modules} non-zero at step 1",
        b_fix,
    )
    report.add("gradient flow: lora_A", *_a_flow(done, modules, spec))


def _a_flow(done: list[_Step], modules: int, spec: LoRAFineTuneSpec) -> tuple[str, str, str, str]:
    """(status, measured, expected, fix) for the lora_A gradients over the steps."""
    expected = f"{modules}/{modules} non-zero by step 2"
    parts = []
    for s in done:
        live = modules - len(s.a_none) - len(s.a_zero)
        note = " (expected: B starts at 0)" if s.b_was_zero and s.a_zero else ""
        parts.append(f"step {s.step}: {live}/{modules} non-zero{note}")
    measured = "; ".join(parts)
    last = done[-1]
    if last.a_none:
        status = FAIL if last.b_none else WARN
        return (
            status,
            measured,
            expected,
            f"lora_A grad is None in {_names(last.a_none)} (LoRAAGradientNone; NoGradientFlow "
            "if lora_B's is None too)",
        )
    if not last.a_zero:
        return PASS, measured, expected, ""
    if last.b_was_zero and (len(done) == 1 or spec.training.learning_rate == 0.0):
        why = "the learning rate is 0" if spec.training.learning_rate == 0.0 else "only 1 step ran"
        return (
            WARN,
            measured,
            expected,
            f"lora_A gradient flow not verified: {why}, so lora_B never left 0",
        )
    if any(s.skipped_by_scaler for s in done[:-1]):
        return (
            WARN,
            measured,
            expected,
            "fp16 loss scaling skipped an earlier step, so lora_B did not move; not verified",
        )
    return (
        FAIL,
        measured,
        expected,
        f"LoRAAGradientZero: lora_A grad exactly 0 at step {last.step} in "
        f"{_names(last.a_zero)} although lora_B had a step with lr "
        f"{spec.training.learning_rate:g}: lora_B does not train (frozen or lr 0 for its group)",
    )
