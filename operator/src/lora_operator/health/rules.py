"""The health rules: one definition and one check per rule (see docs/health-rules.md).

Rules are judged on per-module statistics aggregated as "the fraction of modules flagged"
(absolute gradient norms differ ~100x between modules, so no rule uses one); a module-level
rule fires when at least FLAGGED_FRACTION of the modules cross its threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lora_operator.api import constants as c
from lora_operator.health.records import is_finite
from lora_operator.health.window import NO_DATA, Finding, Outcome, Window, aggregate

FLAGGED_FRACTION = 0.25
EVAL_WINDOW = 3  # eval records compared by EvalNotImproving (first vs last)
EVAL_MIN_GAIN = 0.01  # an eval metric "improved" when it moved by more than 1% the right way

Check = Callable[[Window, float], Outcome]


@dataclass(frozen=True)
class Rule:
    """A rule's definition; thresholds and severities may be overridden in spec.health.rules."""

    name: str
    meaning: str
    threshold: float
    unit: str
    evidence: str
    check: Check | None
    uses_grace: bool = False
    persistent: bool = False  # needs spec.health.consecutiveEvaluations evaluations in a row

    @property
    def severity(self) -> str:
        return str(c.RULE_DEFAULT_SEVERITY[self.name])


def check_non_finite(w: Window, threshold: float) -> Outcome:
    if w.nonfinite_streak >= max(threshold, 1):
        return Finding(
            f"loss non-finite on {w.nonfinite_streak} consecutive steps",
            {"nonfinite_steps": w.nonfinite_streak},
        )
    t = w.telemetry
    if t is None:
        return NO_DATA
    bad = [m for m in t.matrices if m.param_norm is not None and not math.isfinite(m.param_norm)]
    counts = {k: v for k, v in t.nonfinite.items() if v}
    if not bad and not counts.get("nonfinite_param") and not counts.get("nonfinite_exp_avg_sq"):
        return None
    worst = [{"module": m.name, "matrix": m.matrix, "value": m.param_norm} for m in bad[:3]]
    what = ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "non-finite LoRA params"
    return Finding(
        f"non-finite LoRA parameters or Adam state ({what}); the adapter is corrupted",
        {**counts, "matrices_nonfinite": len(bad)},
        worst,
    )


def check_no_supervised_tokens(w: Window, threshold: float) -> Outcome:
    if w.empty_streak < max(threshold, 1):
        return None
    return Finding(
        f"loss NaN or 0 with a zero gradient on {w.empty_streak} consecutive steps: "
        "no token of the batches is supervised (every label -100?)",
        {"empty_steps": w.empty_streak},
    )


def check_no_gradient_flow(w: Window, threshold: float) -> Outcome:
    t = w.telemetry
    if t is None or not t.of("B"):
        return NO_DATA
    b = t.of("B")
    none = sum(m.grad_none for m in b)
    if none / len(b) < threshold:
        return None
    a_none = sum(m.grad_none for m in t.of("A"))
    return Finding(
        f"{none}/{len(b)} lora_B grads are None ({a_none}/{len(t.of('A'))} lora_A): "
        "no gradient reaches the adapter",
        {"b_grads_none": none, "a_grads_none": a_none, "matrices": len(t.matrices)},
    )


def check_a_gradient_zero(w: Window, threshold: float) -> Outcome:
    t = w.telemetry
    if t is None or not t.of("A"):
        return NO_DATA
    if t.step < 2 or w.prior_lr_sum <= 0.0:
        return None
    a = [m for m in t.of("A") if not m.grad_none]
    zero = [m for m in a if m.grad_norm == 0.0]
    if not a or len(zero) / len(a) < threshold:
        return None
    return Finding(
        f"lora_A grad exactly 0 in {len(zero)}/{len(a)} modules although the learning rate "
        f"summed over the earlier steps is {w.prior_lr_sum:.3g}: lora_B never moved off 0",
        {"modules_zero": len(zero), "modules": len(a), "lr_sum_before": w.prior_lr_sum},
        [{"module": m.name, "value": 0.0} for m in zero[:3]],
    )


def check_gradient_collapse(w: Window, threshold: float) -> Outcome:
    t = w.telemetry
    if t is None:
        return NO_DATA
    a = {(m.layer, m.module): m.grad_norm for m in t.of("A") if is_finite(m.grad_norm)}
    items = []
    for m in t.of("B"):
        ga = a.get((m.layer, m.module))
        if ga is None or not is_finite(m.grad_norm):
            continue
        ratio = m.grad_norm / ga if ga > 0 else math.inf  # type: ignore[operator]
        items.append((m.name, ratio))
    agg = aggregate(items, lambda r: r > threshold, worst_is_high=True)
    if agg is None:
        return NO_DATA
    if agg.fraction < FLAGGED_FRACTION:
        return None
    return Finding(
        f"median ||grad B||/||grad A|| {agg.median:.3g} > {threshold:g} in "
        f"{agg.flagged}/{agg.total} modules after grace: lora_B is not growing",
        {**agg.values("ratio"), "lr_sum_b": w.lr_sum_b},
        agg.worst,
    )


def check_adapter_not_learning(w: Window, threshold: float) -> Outcome:
    t = w.telemetry
    if t is None:
        return NO_DATA
    items = [(m.name, m.dw_rel) for m in t.modules if m.dw_rel is not None and m.dw_rel == m.dw_rel]
    agg = aggregate(items, lambda d: d < threshold, worst_is_high=False)
    if agg is None:
        return NO_DATA
    if agg.fraction < FLAGGED_FRACTION:
        return None
    return Finding(
        f"median dW_rel {agg.median:.3g} < {threshold:g} in {agg.flagged}/{agg.total} modules "
        "after grace: the adapter barely changes the model",
        {**agg.values("dw_rel"), "lr_sum_b": w.lr_sum_b},
        agg.worst,
    )


def check_adapter_decay(w: Window, threshold: float) -> Outcome:
    t = w.telemetry
    if t is None:
        return NO_DATA
    items = []
    for m in t.of("A"):
        init = w.a_init.get((m.layer, m.module))
        if init and is_finite(m.param_norm):
            items.append((m.name, m.param_norm / init))  # type: ignore[operator]
    agg = aggregate(items, lambda r: r < threshold, worst_is_high=False)
    if agg is None:
        return NO_DATA
    if agg.fraction < FLAGGED_FRACTION:
        return None
    return Finding(
        f"median ||A||/||A0|| {agg.median:.3g} < {threshold:g} in {agg.flagged}/{agg.total} "
        "modules: lora_A decays away (coupled L2 weight decay?)",
        agg.values("a_norm_ratio"),
        agg.worst,
    )


_FLOORS = {"eval_loss": 0.0, "eval_bleu": 1.0, "eval_rougeL": 0.01}


def _improved(metric: str, first: float, last: float) -> bool:
    gain = (first - last) if metric == "eval_loss" else (last - first)
    return gain > EVAL_MIN_GAIN * max(abs(first), _FLOORS[metric])


def check_eval_not_improving(w: Window, threshold: float) -> Outcome:
    if len(w.evals) < EVAL_WINDOW:
        return NO_DATA
    first, last = w.evals[-EVAL_WINDOW], w.evals[-1]
    (s0, e0, l0), (s1, e1, l1) = ((p.step, p.metrics, p.train_loss) for p in (first, last))
    if l0 is None or l1 is None or not l0:
        return NO_DATA
    fall = (l0 - l1) / abs(l0)
    metrics = [m for m in e1 if m in e0 and is_finite(e0[m]) and is_finite(e1[m])]
    if fall < threshold or not metrics or any(_improved(m, e0[m], e1[m]) for m in metrics):
        return None
    values = {"train_loss_fall": round(fall, 4), "from_step": s0, "to_step": s1}
    values |= {f"{m}_first": e0[m] for m in metrics} | {f"{m}_last": e1[m] for m in metrics}
    return Finding(
        f"train loss fell {fall:.0%} from step {s0} to {s1} while "
        f"{', '.join(metrics)} did not improve: the adapter is not generalising",
        values,
    )


def check_gradient_underflow(w: Window, threshold: float) -> Outcome:
    t = w.telemetry
    if t is None:
        return NO_DATA
    items = [
        (f"{m.name} {m.matrix}", m.grad_zero_fraction)
        for m in t.matrices
        if is_finite(m.grad_norm) and m.grad_norm and is_finite(m.grad_zero_fraction)
    ]
    agg = aggregate(items, lambda z: z > threshold, worst_is_high=True)  # type: ignore[arg-type]
    if agg is None:
        return NO_DATA
    if agg.fraction < FLAGGED_FRACTION:
        return None
    return Finding(
        f"median {agg.median:.2%} of grad elements exactly 0 ({agg.flagged}/{agg.total} "
        f"matrices above {threshold:.2%}): gradients underflow (fp16 without loss scaling?)",
        agg.values("zero_fraction"),
        agg.worst,
    )


def check_a_gradient_none(w: Window, threshold: float) -> Outcome:
    t = w.telemetry
    if t is None or not t.of("A"):
        return NO_DATA
    a, b = t.of("A"), t.of("B")
    none = [m for m in a if m.grad_none]
    if len(none) / len(a) < threshold or (b and all(m.grad_none for m in b)):
        return None
    return Finding(
        f"lora_A grad is None in {len(none)}/{len(a)} modules: lora_A is frozen "
        "(intended only for LoRA-FA)",
        {"modules_none": len(none), "modules": len(a)},
        [{"module": m.name, "value": None} for m in none[:3]],
    )


def check_nan_loss_batch(w: Window, threshold: float) -> Outcome:
    if w.nan_loss_steps < max(threshold, 1):
        return None
    return Finding(
        f"{w.nan_loss_steps} step(s) with a non-finite loss since the previous evaluation",
        {"nan_loss_steps": w.nan_loss_steps},
    )


def check_static_config(w: Window, threshold: float) -> Outcome:
    cfg, problems, values = w.config, [], {}
    if cfg.lora_r and cfg.lora_alpha is not None:
        scale = cfg.lora_alpha / math.sqrt(cfg.lora_r)
        values["alpha_over_sqrt_r"] = round(scale, 4)
        if scale < threshold:
            problems.append(f"alpha/sqrt(r) = {scale:.3g} < {threshold:g}: the adapter is weak")
    if cfg.warmup_steps is not None and cfg.total_steps and cfg.warmup_steps >= cfg.total_steps:
        values |= {"warmup_steps": cfg.warmup_steps, "total_steps": cfg.total_steps}
        problems.append(f"warmup {cfg.warmup_steps} >= total {cfg.total_steps} steps")
    if cfg.learning_rate == 0.0:
        problems.append("learningRate is 0")
    elif w.grace_over and w.lr_seen and not w.lr_positive_seen:
        problems.append("the learning rate has been 0 on every step so far")
    if not problems:
        return None
    return Finding("; ".join(problems), values)


def check_data_quality(w: Window, threshold: float) -> Outcome:
    stats = w.data_stats
    if stats is None:
        return NO_DATA
    problems, values = [], {}
    for key in ("pad_label_fraction", "eos_label_fraction", "supervised_fraction"):
        if isinstance(stats.get(key), int | float):
            values[key] = stats[key]
    pad = values.get("pad_label_fraction", 0.0)
    if values.get("supervised_fraction") == 0.0 and _count(stats, "samples"):
        problems.append("no token of the data is supervised (every label -100)")
    if pad > threshold:
        problems.append(f"{pad:.1%} of supervised labels are the pad token (loss on padding?)")
    for key, what in (
        ("samples_without_supervision", "samples have no supervised token"),
        ("malformed", "malformed samples were skipped"),
    ):
        count = _count(stats, key)
        if count:
            values[key] = count
            problems.append(f"{count} {what}")
    return Finding("; ".join(problems), values) if problems else None


def _count(stats: Mapping[str, object], key: str) -> int:
    value = stats.get(key)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0
