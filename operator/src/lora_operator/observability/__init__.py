"""Prometheus rules, Grafana dashboards and Grafana-managed alert rules, generated from code.

One definition list (`alerts.ALERTS`, `alerts.RECORDING_RULES`) renders the chart's
`files/rules/*.yaml` (the PrometheusRule) and `files/grafana-alerts/*.yaml` (the opt-in
Grafana-managed alternative); `dashboards` builds the dashboards with grafana-foundation-sdk.

    python -m lora_operator.observability --write   # regenerate charts/lora-operator/files
    python -m lora_operator.observability --check   # exit 1 on drift
"""
