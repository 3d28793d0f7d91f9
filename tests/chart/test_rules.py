"""The chart's Prometheus rules: promtool checks and unit tests on the generated files, every
metric they use exists, the alerts and the Grafana-managed alerts are one definition, and the
PrometheusRule the chart renders carries exactly these files."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_operator.api.constants import RULE_NAMES
from lora_operator.observability import alerts
from tests.chart.conftest import CHART, by_kind, one, render
from tests.conftest import ROOT

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
RULE_FILES = sorted((CHART / "files" / "rules").glob("*.yaml"))
METRIC = re.compile(r"\blora_(?:trainer|operator)_[a-z0-9_]+")


def trainer_metric_names() -> set[str]:
    from lora_trainer.telemetry.catalog import CATALOG

    names: set[str] = set()
    for m in CATALOG:
        names.add(m.name)
        if m.type == "histogram":
            names |= {m.name + s for s in ("_bucket", "_sum", "_count")}
    return names


def operator_metric_names() -> set[str]:
    from lora_operator.controller.metrics import OperatorMetrics

    names: set[str] = set()
    for fam in OperatorMetrics().registry.collect():
        if fam.type == "counter":
            names.add(fam.name + "_total")
        elif fam.type == "histogram":
            names |= {fam.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(fam.name)
    return names


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )


def _rules(path: Path) -> list[dict[str, Any]]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_rule_files_exist() -> None:
    assert [p.name for p in RULE_FILES] == ["alerts.yaml", "recording.yaml"]


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    out = promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_unit_tests() -> None:
    out = promtool("test", "rules", "tests/chart/rules_test.yaml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_unit_tests_cover_every_alert_firing_and_silent() -> None:
    tests = yaml.safe_load((ROOT / "tests" / "chart" / "rules_test.yaml").read_text())["tests"]
    fired: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {a.name for a in alerts.ALERTS}
    assert fired == names
    assert silent == names


def test_every_metric_in_the_rules_exists() -> None:
    known = trainer_metric_names() | operator_metric_names()
    used = {
        name
        for path in RULE_FILES
        for rule in _rules(path)
        for name in METRIC.findall(rule["expr"])
    }
    assert used, "no metric found"
    assert used <= known, sorted(used - known)
    assert any(n.startswith("lora_operator_") for n in used)


def test_alerts_carry_severity_summary_description_runbook() -> None:
    for rule in _rules(CHART / "files" / "rules" / "alerts.yaml"):
        assert rule["labels"]["severity"], rule["alert"]
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])
        url: str = rule["annotations"]["runbook_url"]
        if "/runbooks/" in url:
            page = url.rsplit("/runbooks/", 1)[1]
            if "{{" in page:  # templated on the health rule: every rule has a runbook
                for name in RULE_NAMES:
                    assert (ROOT / "docs" / "runbooks" / f"{name}.md").is_file(), name
            else:
                assert (ROOT / "docs" / "runbooks" / page).is_file(), page


def test_thresholds_are_not_retyped() -> None:
    """The per-job alerts fire on the trainer's outcome, never on a health threshold."""
    text = (CHART / "files" / "rules" / "alerts.yaml").read_text()
    for metric in ("lora_grad_norm", "lora_update_ratio", "lora_delta_weight_ratio"):
        assert metric not in text


def test_recording_ratios_clamp_their_denominators() -> None:
    for rule in _rules(CHART / "files" / "rules" / "recording.yaml"):
        if "/" in rule["expr"] and not rule["expr"].startswith("histogram_quantile"):
            assert "clamp_min(" in rule["expr"], rule["record"]


def test_grafana_alerts_are_the_same_definitions() -> None:
    prom = {r["alert"]: r for r in _rules(CHART / "files" / "rules" / "alerts.yaml")}
    graf = yaml.safe_load((CHART / "files" / "grafana-alerts" / "lora-operator.yaml").read_text())
    assert graf["apiVersion"] == 1
    rules = {r["title"]: r for g in graf["groups"] for r in g["rules"]}
    assert rules.keys() == prom.keys()
    for name, rule in rules.items():
        assert rule["for"] == prom[name]["for"]
        assert rule["labels"] == prom[name]["labels"]
        expected = {k: alerts.grafana_template(v) for k, v in prom[name]["annotations"].items()}
        assert rule["annotations"] == expected
        query = rule["data"][0]
        assert query["model"]["expr"] == prom[name]["expr"]
        assert rule["data"][1]["model"] == {"expression": "$A == $A", "refId": "B", "type": "math"}
        assert query["datasourceUid"] == alerts.DATASOURCE_UID_PLACEHOLDER
        assert rule["condition"] == rule["data"][-1]["refId"]
        assert rule["noDataState"] == "OK"
    assert len({r["uid"] for r in rules.values()}) == len(rules)
    assert all(len(r["uid"]) <= 40 for r in rules.values())


def test_generator_for_override() -> None:
    groups = alerts.prometheus_alert_groups(for_override="0s")["groups"]
    assert {r["for"] for g in groups for r in g["rules"]} == {"0s"}


# --- the chart (helm template) -------------------------------------------------------------


def _groups(objs: list[dict[str, Any]]) -> list[str]:
    return [g["name"] for g in one(objs, "PrometheusRule")["spec"]["groups"]]


def test_chart_prometheusrule_embeds_the_files() -> None:
    objs = render({"monitoring": {"releaseLabels": {"release": "kps"}}})
    rule = one(objs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    expected = [
        *yaml.safe_load((CHART / "files" / "rules" / "alerts.yaml").read_text())["groups"],
        *yaml.safe_load((CHART / "files" / "rules" / "recording.yaml").read_text())["groups"],
    ]
    assert rule["spec"]["groups"] == expected  # `{{ $labels }}` not templated by helm
    assert not [
        c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("grafana-alerts")
    ]


def test_chart_grafana_alerts_replace_the_prometheus_alerts() -> None:
    objs = render({"grafana": {"alerts": {"enabled": True}, "dashboards": {"folder": "ML: LoRA"}}})
    assert _groups(objs) == [alerts.GROUP_RECORDING]
    (cm,) = [c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("-alerts")]
    assert cm["metadata"]["labels"]["grafana_alert"] == "1"
    (text,) = cm["data"].values()
    prov = yaml.safe_load(text)
    assert {g["folder"] for g in prov["groups"]} == {"ML: LoRA"}
    titles = {r["title"] for g in prov["groups"] for r in g["rules"]}
    assert titles == {a.name for a in alerts.ALERTS}
    uids = {d["datasourceUid"] for g in prov["groups"] for r in g["rules"] for d in r["data"]}
    assert uids == {"prometheus", "__expr__"}


def test_chart_no_prometheusrule_without_the_api_or_when_disabled() -> None:
    assert not by_kind(render({}, monitoring_api=False), "PrometheusRule")
    assert not by_kind(render({"monitoring": {"enabled": False}}), "PrometheusRule")
    assert not by_kind(
        render({"monitoring": {"prometheusRule": {"enabled": False}}}), "PrometheusRule"
    )
