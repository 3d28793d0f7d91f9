"""The Grafana dashboards, built with grafana-foundation-sdk: one for training jobs (what the
trainers export) and one for the operator. Every query uses the `${datasource}` variable (no
fixed datasource UID) and metric names taken from the trainer's catalog and the operator's
metrics module, so a renamed metric fails here instead of drawing an empty panel."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from grafana_foundation_sdk.builders import common as gcommon
from grafana_foundation_sdk.builders import dashboard as gdash
from grafana_foundation_sdk.builders import heatmap as gheatmap
from grafana_foundation_sdk.builders import prometheus as gprom
from grafana_foundation_sdk.builders import stat as gstat
from grafana_foundation_sdk.builders import statetimeline as gstate
from grafana_foundation_sdk.builders import table as gtable
from grafana_foundation_sdk.builders import timeseries as gts
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as gcm
from grafana_foundation_sdk.models import dashboard as gdm
from grafana_foundation_sdk.models import heatmap as ghm
from grafana_foundation_sdk.models import prometheus as gpm

from lora_operator.controller.metrics import PREFIX as OPERATOR_PREFIX
from lora_operator.observability.alerts import OPERATOR_SELECTOR, RECORDING_RULES
from lora_trainer.telemetry.catalog import BY_NAME

# The PodMonitor's podTargetLabels carry the pod label `lora-operator.dev/job-name` onto the
# trainer series as this Prometheus label.
JOB_LABEL = "lora_operator_dev_job_name"
DATASOURCE = gdm.DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = f'namespace=~"$namespace", {JOB_LABEL}=~"$job"'
RATE = "$__rate_interval"

OPERATOR_METRICS = {
    OPERATOR_PREFIX + n
    for n in (
        "jobs",
        "degraded",
        "degraded_transitions_total",
        "health_read_errors_total",
        "reconcile_duration_seconds",
        "build_info",
    )
}
RECORDED = {r.record for r in RECORDING_RULES}


def t(name: str, sel: str = "", suffix: str = "") -> str:
    """A trainer metric of the catalog with the dashboard's job selector (and `sel`)."""
    full = "lora_trainer_" + name
    if full not in BY_NAME and full not in RECORDED:
        raise KeyError(f"{full} is not in the trainer's catalog")
    inner = ", ".join(s for s in (SEL, sel) if s)
    return f"{full}{suffix}{{{inner}}}"


def r(record: str, sel: str = "") -> str:
    """A recording rule's series with the dashboard's job selector."""
    if record not in RECORDED:
        raise KeyError(f"{record} is not a recording rule")
    inner = ", ".join(s for s in (SEL, sel) if s)
    return f"{record}{{{inner}}}"


def o(name: str, suffix: str = "") -> str:
    """An operator metric."""
    full = OPERATOR_PREFIX + name
    if full not in OPERATOR_METRICS:
        raise KeyError(f"{full} is not an operator metric")
    return full + suffix


def q(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> gprom.Dataquery:
    query = gprom.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    if legend:
        query = query.legend_format(legend)
    return query.instant() if instant else query.range()


Panel = Any  # the SDK's panel builders share no typed base with these methods


def with_panels(d: gdash.Dashboard, row: str, *panels: Panel) -> gdash.Dashboard:
    """`d` with a row titled `row` and its panels, in order."""
    d = d.with_row(gdash.Row(row))
    for panel in panels:
        d = d.with_panel(panel)
    return d


def ts(title: str, unit: str, *queries: gprom.Dataquery, log: bool = False, w: int = 8) -> Panel:
    panel = gts.Panel().title(title).unit(unit).datasource(DATASOURCE).height(8).span(w)
    for query in queries:
        panel = panel.with_target(query)
    if log:
        panel = panel.scale_distribution(
            gcommon.ScaleDistributionConfig().type(gcm.ScaleDistribution.LOG).log(10)
        )
    return panel


def log_ts(title: str, *queries: gprom.Dataquery, w: int = 8) -> Panel:
    """A time series of unitless norms or ratios, on a log scale."""
    return ts(title, "none", *queries, log=True, w=w)


def heat(title: str, expr: str, unit: str = "", log: bool = True) -> Panel:
    """Per-layer heatmap: one row per layer (series named by `layer`)."""
    y_axis = gheatmap.YAxisConfig().unit(unit)
    color = gheatmap.HeatmapColorOptions().mode(ghm.HeatmapColorMode.SCHEME)
    color = color.scheme("Spectral").steps(64)
    if log:
        color = color.scale(ghm.HeatmapColorScale.EXPONENTIAL).exponent(0.5)
    return (
        gheatmap.Panel()
        .title(title)
        .datasource(DATASOURCE)
        .height(9)
        .span(8)
        .calculate(False)
        .y_axis(y_axis)
        .color(color)
        .with_target(q(expr, "{{layer}}"))
    )


def stat(title: str, expr: str, unit: str = "none", w: int = 4, legend: str = "") -> Panel:
    return (
        gstat.Panel()
        .title(title)
        .unit(unit)
        .datasource(DATASOURCE)
        .height(4)
        .span(w)
        .with_target(q(expr, legend, instant=True))
    )


def timeline(title: str, expr: str, legend: str, w: int = 12) -> Panel:
    return (
        gstate.Panel()
        .title(title)
        .datasource(DATASOURCE)
        .height(8)
        .span(w)
        .with_target(q(expr, legend))
        .mappings(
            [
                gdm.ValueMap(
                    options={
                        "0": gdm.ValueMappingResult(text="ok", color="green"),
                        "1": gdm.ValueMappingResult(text="firing", color="red"),
                    }
                )
            ]
        )
    )


def _datasource_var() -> gdash.DatasourceVariable:
    return gdash.DatasourceVariable("datasource").label("Datasource").type("prometheus")


def _query_var(name: str, label: str, query: str) -> gdash.QueryVariable:
    return (
        gdash.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(gdm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .sort(gdm.VariableSort.ALPHABETICAL_ASC)
    )


def _base(uid: str, title: str) -> gdash.Dashboard:
    return (
        gdash.Dashboard(title)
        .uid(uid)
        .tags(["lora-operator"])
        .timezone("browser")
        .refresh("30s")
        .time("now-6h", "now")
        .with_variable(_datasource_var())
    )


def training_dashboard() -> gdash.Dashboard:
    run_info = t("run_info").split("{")[0]  # the catalog's name
    d = _base("lora-operator-training", "LoRA training")
    d = d.with_variable(
        _query_var("namespace", "Namespace", f"label_values({run_info}, namespace)")
    )
    d = d.with_variable(
        _query_var(
            "job", "Job", f'label_values({run_info}{{namespace=~"$namespace"}}, {JOB_LABEL})'
        )
    )
    by = f"namespace, {JOB_LABEL}"
    job_legend = "{{" + JOB_LABEL + "}}"

    d = with_panels(
        d,
        "Progress",
        stat("Step", f"max by ({by}) ({t('steps_total')})", legend=job_legend),
        stat(
            "Tokens/s",
            f"sum by ({by}) ({r('lora_trainer:tokens_per_second:rate5m')})",
            "short",
            legend=job_legend,
        ),
        stat(
            "Samples/s",
            f"sum by ({by}) ({r('lora_trainer:samples_per_second:rate5m')})",
            "short",
            legend=job_legend,
        ),
        stat(
            "Seconds since last step",
            f"time() - max by ({by}) ({t('last_step_timestamp_seconds')})",
            "s",
            legend=job_legend,
        ),
        stat("Training samples", f"max by ({by}) ({t('data_samples')})", legend=job_legend),
        stat("Adapted modules", f"max by ({by}) ({t('lora_modules')})", legend=job_legend),
        ts(
            "Loss: training and eval",
            "none",
            q(t("loss"), job_legend + " train"),
            q(t("eval_loss"), job_legend + " eval", "B"),
        ),
        ts(
            "Eval BLEU and ROUGE-L (x100)",
            "none",
            q(t("eval_bleu"), job_legend + " BLEU"),
            q(f"100 * {t('eval_rouge_l')}", job_legend + " ROUGE-L x100", "B"),
        ),
        log_ts("Gradient norm (before clipping)", q(t("grad_norm"), job_legend)),
        ts("Learning rate", "none", q(t("learning_rate"), job_legend + " group {{group}}")),
        ts(
            "Tokens/s", "short", q(f"sum by ({by}) (rate({t('tokens_total')}[{RATE}]))", job_legend)
        ),
        ts(
            "Step duration (mean)",
            "s",
            q(
                f"sum by ({by}) (rate({t('step_duration_seconds', suffix='_sum')}[{RATE}])) / "
                f"clamp_min(sum by ({by}) "
                f"(rate({t('step_duration_seconds', suffix='_count')}[{RATE}])), 1e-9)",
                job_legend,
            ),
        ),
        ts(
            "GPU memory",
            "bytes",
            q(f"max by (pod) ({t('gpu_memory_allocated_bytes')})", "{{pod}} allocated"),
            q(f"max by (pod) ({t('gpu_memory_reserved_bytes')})", "{{pod}} reserved", "B"),
            q(f"max by (pod) ({t('gpu_memory_peak_bytes')})", "{{pod}} peak", "C"),
        ),
    )

    d = with_panels(
        d,
        "Health",
        timeline(
            "Health rules firing (thresholds: spec.health)",
            f"max by ({by}, rule) ({t('health_rule_firing')})",
            job_legend + " {{rule}}",
            w=16,
        ),
        timeline(
            "Verdict",
            f"max by ({by}, verdict) ({t('health_verdict')}) == 1",
            job_legend + " {{verdict}}",
            w=8,
        ),
    )

    d = with_panels(
        d,
        "LoRA gradients per layer",
        heat("Gradient norm of lora_A per layer", t("lora_layer_grad_norm", 'matrix="A"')),
        heat("Gradient norm of lora_B per layer", t("lora_layer_grad_norm", 'matrix="B"')),
        heat(
            "Gradient norm ratio B/A per layer (clamped)",
            r("lora_trainer:lora_layer_grad_norm:b_over_a"),
        ),
        log_ts(
            "Median gradient norm per matrix",
            q(t("lora_grad_norm_median"), job_legend + " {{matrix}}"),
        ),
        log_ts(
            "Median B/A gradient ratio over modules",
            q(r("lora_trainer:lora_grad_norm:b_over_a_median"), job_legend),
        ),
        ts(
            "Median zero-gradient fraction",
            "percentunit",
            q(t("lora_grad_zero_ratio_median"), job_legend + " {{matrix}}"),
        ),
        log_ts(
            "Top 10 modules by B/A gradient ratio",
            q(f"topk(10, {r('lora_trainer:lora_grad_norm:b_over_a')})", "{{layer}}.{{module}}"),
            w=12,
        ),
        ts("Matrices without gradient", "none", q(t("lora_grad_none_matrices"), job_legend), w=12),
    )

    d = with_panels(
        d,
        "Updates and parameters",
        log_ts(
            "Median update ratio ||dp||/||p||",
            q(t("lora_update_ratio_median"), job_legend + " {{matrix}}"),
        ),
        log_ts(
            "Median dW_rel ||scale BA||/||W||",
            q(t("lora_delta_weight_ratio_median"), job_legend),
        ),
        ts(
            "Median ||A||/||A0||",
            "none",
            q(t("lora_param_norm_init_ratio_median", 'matrix="A"'), job_legend),
        ),
        heat(
            "Update ratio of lora_B per layer (max over modules)",
            "max by (layer) (" + t("lora_update_ratio", 'matrix="B"') + ")",
        ),
        heat(
            "dW_rel per layer (max over modules)",
            f"max by (layer) ({t('lora_delta_weight_ratio')})",
        ),
        heat("Parameter norm of lora_B per layer", t("lora_layer_param_norm", 'matrix="B"')),
    )

    d = with_panels(
        d,
        "Adam",
        log_ts(
            "Top 10 Adam first-moment norms",
            q(f"topk(10, {t('lora_adam_exp_avg_norm')})", "{{layer}}.{{module}}.{{matrix}}"),
        ),
        log_ts(
            "Adam second moment, median over modules",
            q(
                f"quantile by ({by}, matrix) (0.5, {t('lora_adam_exp_avg_sq_mean')})",
                job_legend + " {{matrix}}",
            ),
        ),
        ts("Non-finite elements", "none", q(t("nonfinite_elements"), job_legend + " {{tensor}}")),
    )

    d = d.with_row(gdash.Row("Training data"))
    table = gtable.Panel().title("Training data statistics").datasource(DATASOURCE)
    table = table.height(8).span(24)
    for i, name in enumerate(
        n.removeprefix("lora_trainer_") for n in BY_NAME if n.startswith("lora_trainer_data_")
    ):
        ref = f"D{i}"
        table = table.with_target(
            q(f"max by ({by}) ({t(name)})", name.removeprefix("data_"), ref, instant=True).format(
                gpm.PromQueryFormat.TABLE
            )
        )
    d = d.with_panel(table)
    return d


def operator_dashboard() -> gdash.Dashboard:
    d = _base("lora-operator-overview", "LoRA operator")
    d = d.with_row(gdash.Row("Jobs"))
    d = d.with_panel(
        ts("Jobs by phase", "none", q(f"sum by (phase) ({o('jobs')})", "{{phase}}"), w=12)
    )
    d = d.with_panel(stat("Degraded jobs", f"count({o('degraded')} == 1) or vector(0)", w=4))
    d = d.with_panel(stat("Operator up", f"min(up{{{OPERATOR_SELECTOR}}})", w=4))
    d = d.with_panel(stat("Version", o("build_info"), w=4, legend="{{version}}"))
    degraded = (
        gtable.Panel()
        .title("Degraded jobs (reason: the health rule)")
        .datasource(DATASOURCE)
        .height(8)
        .span(12)
        .with_target(q(f"{o('degraded')} == 1", "", instant=True).format(gpm.PromQueryFormat.TABLE))
    )
    d = d.with_panel(degraded)
    d = d.with_panel(
        ts(
            "Degraded transitions by reason",
            "none",
            q(
                f"sum by (reason) (increase({o('degraded_transitions_total')}[{RATE}]))",
                "{{reason}}",
            ),
            w=12,
        )
    )
    d = d.with_row(gdash.Row("Reconcile and health reads"))
    d = d.with_panel(
        ts(
            "Failed /health reads by kind (per second)",
            "reqps",
            q(f"sum by (kind) (rate({o('health_read_errors_total')}[{RATE}]))", "{{kind}}"),
            w=12,
        )
    )
    bucket = o("reconcile_duration_seconds", "_bucket")
    d = d.with_panel(
        ts(
            "Reconcile duration",
            "s",
            q(f"histogram_quantile(0.5, sum by (le) (rate({bucket}[{RATE}]))) >= 0", "p50"),
            q(f"histogram_quantile(0.99, sum by (le) (rate({bucket}[{RATE}]))) >= 0", "p99", "B"),
            q("lora_operator:reconcile_duration_seconds:p99_5m", "p99 (5m, recorded)", "C"),
            w=12,
        )
    )
    d = d.with_panel(
        ts(
            "Reconciles per second",
            "ops",
            q(f"sum(rate({o('reconcile_duration_seconds', '_count')}[{RATE}]))", "reconciles"),
            w=12,
        )
    )
    return d


DASHBOARDS: dict[str, Callable[[], gdash.Dashboard]] = {
    "lora-training.json": training_dashboard,
    "lora-operator.json": operator_dashboard,
}


def render(name: str) -> str:
    """The dashboard's JSON as committed (sorted keys, 2-space indent, final newline)."""
    model = DASHBOARDS[name]().build()
    return json.dumps(model, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def exprs(dashboard_json: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard's panels."""
    out: list[str] = []
    for panel in dashboard_json.get("panels", []):
        out.extend(str(tg["expr"]) for tg in panel.get("targets", []) if "expr" in tg)
        for sub in panel.get("panels", []):
            out.extend(str(tg["expr"]) for tg in sub.get("targets", []) if "expr" in tg)
    return out
