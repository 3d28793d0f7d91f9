"""The alert and recording rules, defined once and rendered as Prometheus rule groups
(`files/rules/*.yaml`) and as Grafana-managed alert provisioning (`files/grafana-alerts/`).

One source of thresholds: the health thresholds live in each job's `spec.health`; the trainer
evaluates them and exports the outcome (`lora_trainer_health_rule_firing`), and the alerts
below fire on that outcome. The only numbers here are about the pipeline itself (how long
without a step, how long a target may be down).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from grafana_foundation_sdk.builders import alerting as ga
from grafana_foundation_sdk.builders import expr as gexpr
from grafana_foundation_sdk.builders import prometheus as gprom
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import alerting as gam

from lora_operator.controller.metrics import PREFIX as OPERATOR_PREFIX

RUNBOOK_BASE = "https://github.com/lora-operator/lora-operator/blob/main/docs/runbooks"
DOCS_BASE = "https://github.com/lora-operator/lora-operator/blob/main/docs"

# `up` of the operator's own target. A ServiceMonitor's job label is the Service name (the
# chart's fullname, which contains "lora-operator" unless fullnameOverride drops it); a
# PodMonitor's job label is "<namespace>/<podmonitor>", hence the exclusion of "/": the
# trainers' PodMonitor targets must not count as the operator. Override with
# `python -m lora_operator.observability --write --operator-selector '...'`.
OPERATOR_SELECTOR = 'job=~".*lora-operator.*",job!~".*/.*"'

# Placeholders the chart's grafana-alerts template replaces (values: the Prometheus
# datasource UID and the Grafana folder).
DATASOURCE_UID_PLACEHOLDER = "__LORA_DATASOURCE_UID__"
FOLDER_PLACEHOLDER = "__LORA_FOLDER__"

GROUP_TRAINER = "lora-operator.trainer.alerts"
GROUP_OPERATOR = "lora-operator.operator.alerts"
GROUP_RECORDING = "lora-operator.recording"

# Clamp for ratios over norms that may be exactly 0 (lora_A gradients at step 1 under the
# default init): x / 0 is +Inf and quantile() over +Inf is NaN.
EPS = "1e-12"
RATIO_CAP = "1e12"


@dataclass(frozen=True)
class AlertDef:
    """One alert, rendered as a Prometheus alerting rule and a Grafana-managed rule."""

    name: str
    group: str
    expr: str
    for_: str
    severity: str  # a literal or a Go template over $labels
    summary: str
    description: str
    runbook_url: str
    extra_labels: dict[str, str] = field(default_factory=dict)

    def labels(self) -> dict[str, str]:
        return {"severity": self.severity, **self.extra_labels}

    def annotations(self) -> dict[str, str]:
        return {
            "summary": self.summary,
            "description": self.description,
            "runbook_url": self.runbook_url,
        }


@dataclass(frozen=True)
class RecordingDef:
    record: str
    expr: str


def alert_defs(operator_selector: str = OPERATOR_SELECTOR) -> tuple[AlertDef, ...]:
    """Every alert; `operator_selector` picks the operator's `up` series."""
    sel = operator_selector
    return (
        AlertDef(
            "LoRATrainingDegraded",
            GROUP_TRAINER,
            "max by (namespace, pod, rule, severity) "
            '(lora_trainer_health_rule_firing{severity=~"Degraded|Critical"}) == 1',
            "1m",
            '{{ if eq $labels.severity "Critical" }}critical{{ else }}warning{{ end }}',
            "{{ $labels.rule }} ({{ $labels.severity }}) in {{ $labels.namespace }}/"
            "{{ $labels.pod }}",
            "The trainer's health rule {{ $labels.rule }} fires with severity "
            "{{ $labels.severity }} (thresholds: the job's spec.health). Evidence: "
            "kubectl describe lft and status.health.rulesFiring.",
            RUNBOOK_BASE + "/{{ $labels.rule }}.md",
            {"health_severity": "{{ $labels.severity }}"},
        ),
        AlertDef(
            "LoRATrainingNonFiniteLoss",
            GROUP_TRAINER,
            "sum by (namespace, pod) (lora_trainer_nonfinite_elements) > 0"
            " or count by (namespace, pod) "
            "(lora_trainer_loss != lora_trainer_loss or abs(lora_trainer_loss) == +Inf)",
            "1m",
            "critical",
            "Non-finite loss or tensors in {{ $labels.namespace }}/{{ $labels.pod }}",
            "The latest collected loss is NaN/Inf or gradients, parameters or Adam's second "
            "moment hold non-finite elements ({{ $value }}).",
            RUNBOOK_BASE + "/NonFinite.md",
        ),
        AlertDef(
            "LoRATrainingNoProgress",
            GROUP_TRAINER,
            # `offset 15m`: the series existed 15 minutes ago, so the window is a full 15
            # minutes of no step (not the first minutes of a run still loading its model).
            "increase(lora_trainer_steps_total[15m]) == 0 and lora_trainer_steps_total offset 15m",
            "5m",
            "warning",
            "No optimizer step in 15m in {{ $labels.namespace }}/{{ $labels.pod }}",
            "lora_trainer_steps_total did not increase for 15 minutes while the trainer "
            "is still scraped: hung collective, dataloader or stuck checkpoint.",
            RUNBOOK_BASE + "/Stalled.md",
        ),
        AlertDef(
            "LoRATrainerStale",
            GROUP_TRAINER,
            "time() - (max by (namespace, pod) "
            "(lora_trainer_last_step_timestamp_seconds) > 0) > 900",
            "5m",
            "warning",
            "Last step of {{ $labels.namespace }}/{{ $labels.pod }} is "
            "{{ $value | humanizeDuration }} old",
            "The pod still exports its last values but no rank finished an optimizer step "
            "for over 15 minutes.",
            RUNBOOK_BASE + "/Stalled.md",
        ),
        AlertDef(
            "LoRAJobDegraded",
            GROUP_OPERATOR,
            f"max by (namespace, name, reason) ({OPERATOR_PREFIX}degraded) == 1",
            "1m",
            "warning",
            "LoRAFineTune {{ $labels.namespace }}/{{ $labels.name }} is Degraded "
            "({{ $labels.reason }})",
            "The operator set the Degraded condition (reason {{ $labels.reason }}, which "
            "includes the operator-side Stalled rule); see kubectl describe lft.",
            RUNBOOK_BASE + "/{{ $labels.reason }}.md",
        ),
        AlertDef(
            "LoRAOperatorHealthReadErrors",
            GROUP_OPERATOR,
            f"sum by (namespace, kind) (rate({OPERATOR_PREFIX}health_read_errors_total[10m])) > 0",
            "10m",
            "warning",
            "The operator cannot read trainers' /health ({{ $labels.kind }})",
            "Failed /health reads of kind {{ $labels.kind }} for 10 minutes: the operator "
            "cannot see health verdicts (network policy, trainer port, overloaded rank 0).",
            DOCS_BASE + "/operator.md#operator-endpoints-and-metrics",
        ),
        AlertDef(
            "LoRAOperatorDown",
            GROUP_OPERATOR,
            f"absent(up{{{sel}}}) or up{{{sel}}} == 0",
            "5m",
            "critical",
            "The lora-operator is not scraped or down",
            "No healthy operator target for 5 minutes: no reconciles, no health reads, "
            "no Degraded conditions.",
            DOCS_BASE + "/operator.md#operator-endpoints-and-metrics",
        ),
    )


ALERTS = alert_defs()

_B = 'lora_trainer_lora_grad_norm{matrix="B"}'
_A = 'lora_trainer_lora_grad_norm{matrix="A"}'
_LB = 'lora_trainer_lora_layer_grad_norm{matrix="B"}'
_LA = 'lora_trainer_lora_layer_grad_norm{matrix="A"}'

# Recording rules only feed dashboards; alerts never depend on them. Norms are >= 0, so
# `>= 0` drops NaN inputs; clamp_min keeps the denominator away from 0, clamp_max keeps
# +Inf numerators finite.
RECORDING_RULES: tuple[RecordingDef, ...] = (
    RecordingDef(
        "lora_trainer:lora_grad_norm:b_over_a",
        f"max without (matrix) (clamp_max(({_B} >= 0) / ignoring (matrix) "
        f"clamp_min({_A} >= 0, {EPS}), {RATIO_CAP}))",
    ),
    RecordingDef(
        "lora_trainer:lora_layer_grad_norm:b_over_a",
        f"max without (matrix) (clamp_max(({_LB} >= 0) / ignoring (matrix) "
        f"clamp_min({_LA} >= 0, {EPS}), {RATIO_CAP}))",
    ),
    RecordingDef(
        "lora_trainer:lora_grad_norm:b_over_a_median",
        "quantile without (layer, module) (0.5, lora_trainer:lora_grad_norm:b_over_a)",
    ),
    RecordingDef(
        "lora_trainer:tokens_per_second:rate5m",
        "sum without (instance) (rate(lora_trainer_tokens_total[5m]))",
    ),
    RecordingDef(
        "lora_trainer:samples_per_second:rate5m",
        "sum without (instance) (rate(lora_trainer_samples_total[5m]))",
    ),
    RecordingDef(
        "lora_trainer:step_duration_seconds:mean5m",
        "rate(lora_trainer_step_duration_seconds_sum[5m]) / "
        "clamp_min(rate(lora_trainer_step_duration_seconds_count[5m]), 1e-9)",
    ),
    RecordingDef(
        "lora_operator:reconcile_duration_seconds:p99_5m",
        f"histogram_quantile(0.99, sum by (le) "
        f"(rate({OPERATOR_PREFIX}reconcile_duration_seconds_bucket[5m]))) >= 0",
    ),
    RecordingDef(
        "lora_operator:reconcile_duration_seconds:p50_5m",
        f"histogram_quantile(0.5, sum by (le) "
        f"(rate({OPERATOR_PREFIX}reconcile_duration_seconds_bucket[5m]))) >= 0",
    ),
)


def _alert_rule(alert: AlertDef, for_override: str | None) -> dict[str, Any]:
    return {
        "alert": alert.name,
        "expr": alert.expr,
        "for": for_override if for_override is not None else alert.for_,
        "labels": alert.labels(),
        "annotations": alert.annotations(),
    }


def prometheus_alert_groups(
    alerts: tuple[AlertDef, ...] = ALERTS, for_override: str | None = None
) -> dict[str, Any]:
    """The alerting rule groups (files/rules/alerts.yaml). `for_override` replaces every
    `for:` (tests against a live Prometheus use a short one)."""
    groups: list[dict[str, Any]] = []
    for name in (GROUP_TRAINER, GROUP_OPERATOR):
        rules = [_alert_rule(a, for_override) for a in alerts if a.group == name]
        groups.append({"name": name, "rules": rules})
    return {"groups": groups}


def prometheus_recording_groups() -> dict[str, Any]:
    """The recording rule groups (files/rules/recording.yaml), for dashboards only."""
    rules = [{"record": r.record, "expr": r.expr} for r in RECORDING_RULES]
    return {"groups": [{"name": GROUP_RECORDING, "rules": rules}]}


def _uid(name: str) -> str:
    return "lora-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def grafana_template(text: str) -> str:
    """A Prometheus annotation/label template in Grafana's dialect: `$value` is the value of
    query A there (Grafana's own `$value` is a string of every query's values)."""
    return text.replace("$value", "$values.A.Value")


def _grafana_rule(alert: AlertDef) -> dict[str, Any]:
    # Every expression returns only its alerting series (values may be 0, e.g. `up == 0`,
    # never NaN), so the condition is "A has a value": the math expression `$A == $A`.
    query = (
        ga.Query("A")
        .datasource_uid(DATASOURCE_UID_PLACEHOLDER)
        .relative_time_range(gam.RelativeTimeRange(from_val=900, to=0))
        .model(gprom.Dataquery().expr(alert.expr).instant().ref_id("A"))
    )
    condition = (
        ga.Query("B")
        .datasource_uid("__expr__")
        .model(gexpr.TypeMath().ref_id("B").expression("$A == $A"))
    )
    rule = (
        ga.Rule(alert.name)
        .uid(_uid(alert.name))
        .condition("B")
        .queries([query, condition])
        .for_val(alert.for_)
        .no_data_state("OK")
        .exec_err_state("Error")
        .labels({k: grafana_template(v) for k, v in alert.labels().items()})
        .annotations({k: grafana_template(v) for k, v in alert.annotations().items()})
    )
    payload: dict[str, Any] = JSONEncoder().default(rule.build())
    # Provisioning files name the group and folder once per group, not per rule.
    for key in ("folderUID", "ruleGroup", "orgID"):
        payload.pop(key, None)
    encoded: dict[str, Any] = _plain(payload)
    return encoded


def _plain(value: Any) -> Any:
    """The SDK's nested models as plain JSON data."""
    return json.loads(json.dumps(value, cls=JSONEncoder))


def grafana_alert_provisioning(alerts: tuple[AlertDef, ...] = ALERTS) -> dict[str, Any]:
    """Grafana alerting provisioning (`apiVersion: 1`) with the same alerts; the chart
    replaces the datasource UID and folder placeholders."""
    groups: list[dict[str, Any]] = []
    for name in (GROUP_TRAINER, GROUP_OPERATOR):
        groups.append(
            {
                "orgId": 1,
                "name": name,
                "folder": FOLDER_PLACEHOLDER,
                "interval": "1m",
                "rules": [_grafana_rule(a) for a in alerts if a.group == name],
            }
        )
    return {"apiVersion": 1, "groups": groups}


def all_exprs() -> list[str]:
    """Every PromQL expression of the alerts, recording rules and Grafana alert queries."""
    out = [a.expr for a in ALERTS] + [r.expr for r in RECORDING_RULES]
    for group in grafana_alert_provisioning()["groups"]:
        for rule in group["rules"]:
            for data in rule["data"]:
                if data["datasourceUid"] != "__expr__":
                    out.append(data["model"]["expr"])
    return out
