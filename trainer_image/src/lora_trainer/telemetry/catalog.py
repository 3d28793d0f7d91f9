"""Every `lora_trainer_*` metric as data: the exporter builds its families from this catalog
and docs/metrics.md is generated from it (drift-tested), so code and docs cannot disagree.

    python -m lora_trainer.telemetry.catalog --write docs/metrics.md   # regenerate
    python -m lora_trainer.telemetry.catalog --check docs/metrics.md   # exit 1 on drift

Conventions (docs: /work/shared/design/observability.md): base units as a plural suffix,
counters end in `_total`, metadata in `_info`, bounded labels only (`layer`, `module`,
`matrix`, `group`, `tensor`, and the run's settings in `lora_trainer_run_info`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

MetricType = Literal["counter", "gauge", "histogram"]
# rank: every rank's process writes it (prometheus_client multiprocess mode, summed/maxed
# over the pod's ranks); job: the global rank 0 custom collector (job-wide statistics).
Source = Literal["rank", "job"]
# Where the exporter reads the value (exporter.py dispatches on it; `field` names the attribute).
Scope = Literal[
    "progress",  # trainer.state.global_step
    "info",  # run_info labels, value 1
    "collector",  # TelemetryCollector attribute
    "step",  # StepStats attribute
    "count",  # len() of a StepStats list
    "group",  # StepStats list per param group (label group)
    "tensor",  # StepStats f"{field}{tensor}" per label value (label tensor)
    "matrix_median",  # median over modules of a MatrixStats attribute (label matrix)
    "module_median",  # median over modules of a ModuleStats attribute
    "layer",  # L2 over a layer's modules of a MatrixStats norm (labels layer, matrix)
    "matrix",  # MatrixStats attribute (labels layer, module, matrix)
    "module",  # ModuleStats attribute (labels layer, module)
    "data",  # DataStats attribute of the training split
    "rank",  # prometheus_client metric updated by telemetry.counters.RankMetricsCallback
    "health",  # the health monitor's rules (lora_trainer.health_monitor)
]
When = Literal["always", "collected", "cuda", "health"]

PREFIX = "lora_trainer_"
MATRIX_LABELS = ("layer", "module", "matrix")
MODULE_LABELS = ("layer", "module")
RUN_INFO_LABELS = (
    "model",
    "r",
    "alpha",
    "target_modules",
    "zero_stage",
    "world_size",
    "device",
    "precision",
    "torch_version",
    "transformers_version",
    "peft_version",
    "deepspeed_version",
    "trainer_version",
    "spec_hash",
)
NONFINITE_TENSORS = ("grad", "param", "exp_avg_sq")
STEP_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class MetricDef:
    """One metric family: what /metrics shows and what docs/metrics.md says about it."""

    name: str  # as queried: counters end in _total
    type: MetricType
    help: str
    unit: str  # base unit, "ratio" (0-1, or unbounded where said), or "" (a count or norm)
    promql: str  # an example query
    source: Source
    scope: Scope
    field: str = ""
    labels: tuple[str, ...] = ()
    per_module: bool = False  # dropped when spec.monitoring.perModule is false
    when: When = "always"  # collected: after the first LoRA collection; cuda: CUDA ranks only
    mode: str = ""  # multiprocess_mode of a rank gauge
    section: str = ""

    @property
    def family(self) -> str:
        """The family name prometheus_client and its parser use (counters without _total)."""
        return self.name.removesuffix("_total") if self.type == "counter" else self.name


def _m(name: str, type_: MetricType, help_: str, unit: str, promql: str, **kw: Any) -> MetricDef:
    return MetricDef(PREFIX + name, type_, help_, unit, promql, **kw)


S_PROGRESS = "Progress and run"
S_RANK = "Per rank (every process; multiprocess mode)"
S_JOB = "Job-wide statistics of the latest collection"
S_AGG = "LoRA aggregates (always exported)"
S_MODULE = "Per module and matrix (spec.monitoring.perModule)"
S_DATA = "Training data"
S_HEALTH = "Health rules (docs/health-rules.md)"
SECTIONS = (S_PROGRESS, S_HEALTH, S_RANK, S_JOB, S_AGG, S_MODULE, S_DATA)


# The definitions, one call per metric, kept table-like by hand.
# fmt: off
def _progress() -> Iterator[MetricDef]:
    kw: dict[str, Any] = {"section": S_PROGRESS, "source": "job"}
    yield _m("steps_total", "counter", "Optimizer steps done (the job's global step).", "steps",
             "increase(lora_trainer_steps_total[15m]) == 0", scope="progress", **kw)
    yield _m("run_info", "gauge", "Always 1; the labels describe the run (model, adapter, "
             "ZeRO stage, world size, versions, spec hash).", "",
             "lora_trainer_loss * on(pod) group_left(model, r) lora_trainer_run_info",
             scope="info", labels=RUN_INFO_LABELS, **kw)
    for name, field, what, unit in (
        ("eval_loss", "eval_loss", "Loss on the eval set's supervised tokens", ""),
        ("eval_bleu", "bleu", "Corpus BLEU (0-100) of generated eval replies", ""),
        ("eval_rouge_l", "rouge_l", "Mean ROUGE-L F1 of generated eval replies", "ratio"),
    ):
        yield _m(name, "gauge", f"{what} at the latest evaluation (the step-0 baseline first; "
                 "absent until then).", unit, f"delta(lora_trainer_{name}[1h])",
                 scope="health", field=field, when="health", **kw)
    kw["when"] = "collected"
    yield _m("telemetry_step", "gauge", "Optimizer step of the latest LoRA statistics.", "steps",
             "lora_trainer_steps_total - lora_trainer_telemetry_step", scope="step",
             field="step", **kw)
    yield _m("telemetry_timestamp_seconds", "gauge", "Unix time of the latest LoRA statistics.",
             "seconds", "time() - lora_trainer_telemetry_timestamp_seconds > 600",
             scope="collector", field="latest_time", **kw)


def _rank() -> Iterator[MetricDef]:
    kw: dict[str, Any] = {"section": S_RANK, "source": "rank", "scope": "rank"}
    yield _m("samples_total", "counter", "Training sequences (batch rows) fed forward, summed "
             "over the pod's ranks; with packing a row holds several samples.", "samples",
             "sum(rate(lora_trainer_samples_total[5m]))", **kw)
    yield _m("tokens_total", "counter", "Token positions fed forward (rows x sequence length, "
             "padding included), summed over the pod's ranks.", "tokens",
             "sum(rate(lora_trainer_tokens_total[5m]))", **kw)
    yield _m("step_duration_seconds", "histogram", "Wall time of each rank's optimizer step "
             "(forward, backward, optimizer; not data loading, eval or checkpoints); _count "
             "counts the rank-steps of the pod.", "seconds",
             "rate(lora_trainer_step_duration_seconds_sum[5m]) / "
             "rate(lora_trainer_step_duration_seconds_count[5m])", **kw)
    yield _m("last_step_timestamp_seconds", "gauge", "Unix time the last optimizer step of "
             "any of the pod's ranks ended.", "seconds",
             "time() - lora_trainer_last_step_timestamp_seconds > 900", mode="max", **kw)
    for name, what in (
        ("gpu_memory_allocated_bytes", "GPU memory held by tensors at step end"),
        ("gpu_memory_reserved_bytes", "GPU memory reserved by the caching allocator"),
        ("gpu_memory_peak_bytes", "Peak GPU memory held by tensors since the rank started"),
    ):
        yield _m(name, "gauge", f"{what}; the largest over the pod's ranks.", "bytes",
                 f"max by (pod) (lora_trainer_{name})", mode="max", when="cuda", **kw)


def _job() -> Iterator[MetricDef]:
    kw: dict[str, Any] = {"section": S_JOB, "source": "job", "when": "collected"}
    yield _m("loss", "gauge", "Training loss of the latest collected step.", "",
             "lora_trainer_loss != lora_trainer_loss", scope="step", field="loss", **kw)
    yield _m("grad_norm", "gauge", "Total L2 norm of the trainable gradients before clipping.",
             "", "max_over_time(lora_trainer_grad_norm[1h])", scope="step",
             field="lora_grad_norm", **kw)
    yield _m("lora_modules", "gauge", "Adapted modules.", "", "lora_trainer_lora_modules",
             scope="count", field="modules", **kw)
    yield _m("lora_grad_none_matrices", "gauge", "LoRA matrices whose gradient is None.", "",
             "lora_trainer_lora_grad_none_matrices > 0", scope="step", field="grad_none", **kw)
    yield _m("learning_rate", "gauge", "Learning rate of each optimizer param group.", "",
             'lora_trainer_learning_rate{group="0"}', scope="group", field="lr",
             labels=("group",), **kw)
    yield _m("learning_rate_sum", "gauge", "Cumulative learning rate of each param group.", "",
             "lora_trainer_learning_rate_sum", scope="group", field="lr_sum",
             labels=("group",), **kw)
    yield _m("nonfinite_elements", "gauge", "Non-finite (NaN/Inf) elements at the latest "
             "collection, per tensor kind (grad, param, exp_avg_sq).", "",
             "sum(lora_trainer_nonfinite_elements) > 0", scope="tensor", field="nonfinite_",
             labels=("tensor",), **kw)


# (suffix, MatrixStats field, meaning, unit, a median over modules is exported)
MATRIX_STATS = (
    ("lora_grad_norm", "grad_norm",
     "L2 norm of the LoRA matrix gradient before clipping.", "", True),
    ("lora_grad_zero_ratio", "grad_zero_fraction",
     "Fraction of gradient elements exactly 0.", "ratio", True),
    ("lora_param_norm", "param_norm",
     "L2 norm of the LoRA matrix after the step.", "", True),
    ("lora_param_norm_init_ratio", "param_norm_ratio",
     "LoRA matrix norm over its initial norm (+Inf for B under default init).", "ratio", True),
    ("lora_update_ratio", "update_ratio",
     "||p_after - p_before|| / ||p_before|| of the step.", "ratio", True),
    ("lora_adam_exp_avg_norm", "exp_avg_norm",
     "L2 norm of Adam's first moment.", "", False),
    ("lora_adam_exp_avg_sq_mean", "exp_avg_sq_mean",
     "Mean of Adam's second moment.", "", False),
    ("lora_learning_rate_sum", "lr_sum",
     "Cumulative learning rate of the matrix's param group.", "", False),
)
DW_HELP = "||scale * B @ A||_F / ||W||_F of the adapted module after the step."


def _aggregates() -> Iterator[MetricDef]:
    kw: dict[str, Any] = {"section": S_AGG, "source": "job", "when": "collected"}
    for suffix, field, meaning, unit, median in MATRIX_STATS:
        if median:
            yield _m(f"{suffix}_median", "gauge", f"Median over modules: {meaning}", unit,
                     f'lora_trainer_{suffix}_median{{matrix="B"}}', scope="matrix_median",
                     field=field, labels=("matrix",), **kw)
    yield _m("lora_delta_weight_ratio_median", "gauge", f"Median over modules: {DW_HELP}",
             "ratio", "lora_trainer_lora_delta_weight_ratio_median", scope="module_median",
             field="dw_rel", **kw)
    for suffix, field, what in (
        ("lora_layer_grad_norm", "grad_norm", "gradient (before clipping)"),
        ("lora_layer_param_norm", "param_norm", "parameters (after the step)"),
    ):
        yield _m(suffix, "gauge", f"L2 norm over the layer's adapted modules of the LoRA "
                 f"{what}, per matrix.", "", f'topk(5, lora_trainer_{suffix}{{matrix="A"}})',
                 scope="layer", field=field, labels=("layer", "matrix"), **kw)


def _per_module() -> Iterator[MetricDef]:
    kw: dict[str, Any] = {"section": S_MODULE, "source": "job", "when": "collected",
                          "per_module": True}
    for suffix, field, meaning, unit, _ in MATRIX_STATS:
        yield _m(suffix, "gauge", meaning, unit, f'topk(10, lora_trainer_{suffix}{{matrix="B"}})',
                 scope="matrix", field=field, labels=MATRIX_LABELS, **kw)
    yield _m("lora_delta_weight_ratio", "gauge", DW_HELP, "ratio",
             "max by (module) (lora_trainer_lora_delta_weight_ratio)", scope="module",
             field="dw_rel", labels=MODULE_LABELS, **kw)


# (suffix, DataStats field, meaning, unit)
DATA_STATS = (
    ("data_samples", "samples", "Training samples after encoding.", "samples"),
    ("data_malformed_samples", "malformed", "Training rows dropped as malformed.", "samples"),
    ("data_tokens", "tokens", "Tokens in the encoded training samples.", "tokens"),
    ("data_supervised_tokens", "supervised_tokens", "Tokens with a label (not -100).", "tokens"),
    ("data_supervised_ratio", "supervised_fraction",
     "Supervised tokens over all tokens.", "ratio"),
    ("data_unsupervised_samples", "samples_without_supervision",
     "Samples without any supervised token.", "samples"),
    ("data_truncated_samples", "truncated_samples",
     "Samples cut at dataset.maxLength.", "samples"),
    ("data_truncated_ratio", "truncation_rate", "Truncated samples over all samples.", "ratio"),
    ("data_dropped_turn_samples", "samples_with_dropped_turns",
     "Samples that lost whole turns to truncation.", "samples"),
    ("data_special_label_ratio", "special_token_ratio",
     "Special tokens among supervised labels.", "ratio"),
    ("data_pad_label_ratio", "pad_label_fraction", "Pad tokens among supervised labels.", "ratio"),
    ("data_eos_label_ratio", "eos_label_fraction", "EOS tokens among supervised labels.", "ratio"),
    ("data_mean_length_tokens", "mean_length", "Mean encoded sample length.", "tokens"),
    ("data_max_length_tokens", "max_length", "Longest encoded sample.", "tokens"),
)


def _health() -> Iterator[MetricDef]:
    kw: dict[str, Any] = {"section": S_HEALTH, "source": "job", "scope": "health",
                          "when": "health"}
    yield _m("health_verdict", "gauge", "1 for the current verdict of the health rules "
             "(Unknown before the first evaluation, Healthy, Warning, Degraded, Critical), 0 "
             "for the others.", "", 'lora_trainer_health_verdict{verdict=~"Degraded|Critical"} '
             "== 1", field="verdict", labels=("verdict",), **kw)
    yield _m("health_rule_firing", "gauge", "1 while the rule fires (after its grace period "
             "and consecutive evaluations), 0 otherwise; one series per enabled rule.", "",
             "max by (namespace, pod, rule, severity) (lora_trainer_health_rule_firing) == 1",
             field="firing", labels=("rule", "severity"), **kw)
    yield _m("health_rule_last_firing_step", "gauge", "Latest step at which the rule fired "
             "(rules that never fired have no series).", "steps",
             "lora_trainer_steps_total - on(pod) group_right "
             "lora_trainer_health_rule_last_firing_step", field="last_firing_step",
             labels=("rule",), **kw)
    yield _m("health_evaluation_step", "gauge", "Step of the latest evaluation of the rules.",
             "steps", "lora_trainer_steps_total - lora_trainer_health_evaluation_step",
             field="step", **kw)


def _data() -> Iterator[MetricDef]:
    for suffix, field, meaning, unit in DATA_STATS:
        yield _m(suffix, "gauge", f"{meaning} Training split, computed once at start.", unit,
                 f"lora_trainer_{suffix}", source="job", scope="data", field=field,
                 section=S_DATA)
# fmt: on


CATALOG: tuple[MetricDef, ...] = (
    *_progress(),
    *_health(),
    *_rank(),
    *_job(),
    *_aggregates(),
    *_per_module(),
    *_data(),
)
BY_NAME = {m.name: m for m in CATALOG}


def rank_metrics() -> tuple[MetricDef, ...]:
    return tuple(m for m in CATALOG if m.source == "rank")


def job_metrics() -> tuple[MetricDef, ...]:
    return tuple(m for m in CATALOG if m.source == "job")


# -- docs/metrics.md -----------------------------------------------------------------------

HEADER = """\
<!-- Generated by `python -m lora_trainer.telemetry.catalog --write docs/metrics.md`
     from trainer_image/src/lora_trainer/telemetry/catalog.py. Do not edit by hand. -->
# Trainer metrics

Every training pod serves `/metrics` on its named port `metrics` (`spec.monitoring.port`),
from local rank 0. Its registry combines:

- **per-rank** metrics: every rank's process writes them through prometheus_client's
  multiprocess mode (`$PROMETHEUS_MULTIPROC_DIR`, created and wiped by `lora-train launch`);
  counters and histograms are summed over the pod's ranks, gauges take the largest rank's
  value. A single-process `lora-train` serves them from a plain registry;
- **job-wide** metrics, from a collector on global rank 0 only: the latest LoRA/Adam
  statistics (collected every `spec.monitoring.intervalSteps` steps; absent until the first
  collection), the run's settings and the training data statistics.

`spec.monitoring.perModule: false` drops the per-module families (layers x modules x 2
series each); the medians and per-layer aggregates remain. Labels are bounded: `layer`
(index), `module` (q, k, v, o, gate, up, down), `matrix` (A, B), `group` (optimizer param
group index), `tensor` (grad, param, exp_avg_sq). Units are base units (seconds, bytes;
ratio: a fraction, 0-1 unless said otherwise); an empty unit is a count or a norm.
"""


SERVED_BY = {"job": "global rank 0", "rank": "every pod"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """docs/metrics.md."""
    out = [HEADER]
    for section in SECTIONS:
        out += [
            f"\n## {section}\n",
            "| metric | type | labels | unit | served by | meaning | example PromQL |",
        ]
        out.append("|---|---|---|---|---|---|---|")
        for m in (m for m in CATALOG if m.section == section):
            labels = ", ".join(f"`{label}`" for label in m.labels)
            notes = {
                "collected": "",
                "cuda": " CUDA ranks only.",
                "always": "",
                "health": " Global rank 0, when the health rules run.",
            }[m.when]
            if m.mode:
                notes += f" Multiprocess mode `{m.mode}`."
            served = SERVED_BY[m.source]
            cells = (f"`{m.name}`", m.type, labels, m.unit, served, m.help + notes, f"`{m.promql}`")
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write or check docs/metrics.md.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, metavar="PATH", help="write the metrics docs")
    group.add_argument("--check", type=Path, metavar="PATH", help="exit 1 if PATH drifted")
    args = parser.parse_args(argv)
    text = render()
    if args.write is not None:
        args.write.write_text(text)
        return 0
    current = args.check.read_text() if args.check.exists() else ""
    if current != text:
        print(
            f"{args.check} drifted from the metric catalog; run: python -m "
            f"lora_trainer.telemetry.catalog --write {args.check}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
