"""The generated Grafana dashboards and alert files: committed output equals the generator's
(drift), every PromQL expression parses with promtool, `${datasource}` everywhere, the panels
that matter exist, and the chart ships them as sidecar ConfigMaps."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_operator.observability import alerts, dashboards
from lora_operator.observability.__main__ import generated, main
from tests.chart.conftest import CHART, by_kind, render
from tests.chart.test_rules import PROMTOOL, operator_metric_names, trainer_metric_names
from tests.conftest import ROOT

DASHBOARD_FILES = sorted((CHART / "files" / "dashboards").glob("*.json"))
# Grafana's variables, replaced by something promtool accepts.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$namespace": ".*", "$job": ".*"}


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CHART / "files" / "dashboards" / name).read_text())
    return data


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _dashboard_exprs() -> list[str]:
    return [e for p in DASHBOARD_FILES for e in dashboards.exprs(json.loads(p.read_text()))]


def test_generated_files_are_up_to_date() -> None:
    assert main(["--check"]) == 0, "run: python -m lora_operator.observability --write"
    assert sorted(p.name for p in DASHBOARD_FILES) == ["lora-operator.json", "lora-training.json"]
    for rel, content in generated().items():
        assert (CHART / rel).read_text() == content, rel


def test_check_reports_drift(tmp_path: Path) -> None:
    assert main(["--write", "--chart", str(tmp_path)]) == 0
    assert main(["--check", "--chart", str(tmp_path)]) == 0
    (tmp_path / "files" / "dashboards" / "lora-training.json").write_text("{}\n")
    assert main(["--check", "--chart", str(tmp_path)]) == 1


def test_sdk_pinned_exactly() -> None:
    version = importlib.metadata.version("grafana-foundation-sdk")
    assert f'"grafana-foundation-sdk=={version}"' in (ROOT / "pyproject.toml").read_text()


def test_every_expr_parses_with_promtool(tmp_path: Path) -> None:
    exprs = [*_dashboard_exprs(), *alerts.all_exprs()]
    assert len(exprs) > 40
    rules = []
    for i, expr in enumerate(exprs):
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr.replace("$1", ""), expr
        rules.append({"record": f"check:expr_{i}", "expr": expr})
    path = tmp_path / "exprs.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    out = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_metric_in_the_dashboards_exists() -> None:
    known = trainer_metric_names() | operator_metric_names()
    found = r"\blora_(?:trainer|operator)_[a-z0-9_]+"
    used = {n for e in _dashboard_exprs() for n in re.findall(found, e)} - {dashboards.JOB_LABEL}
    assert used <= known, sorted(used - known)
    recorded = {r.record for r in alerts.RECORDING_RULES}
    used_recorded = {n for e in _dashboard_exprs() for n in re.findall(r"\blora_\w+:[\w:]+", e)}
    assert used_recorded <= recorded, sorted(used_recorded - recorded)


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_datasource_is_a_variable(path: Path) -> None:
    dash = json.loads(path.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in _panels(dash):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${datasource}"
    uids = re.findall(r'"uid": "([^"]*)"', path.read_text())
    assert set(uids) == {"${datasource}", dash["uid"]}


def test_training_dashboard_panels() -> None:
    dash = _load("lora-training.json")
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert "lora_trainer_run_info" in variables["job"]["query"]
    assert dashboards.JOB_LABEL in variables["job"]["query"]
    panels = {p["title"]: p for p in _panels(dash)}
    for title in (
        "Loss: training and eval",
        "Eval BLEU and ROUGE-L (x100)",
        "Learning rate",
        "Tokens/s",
        "GPU memory",
        "Health rules firing (thresholds: spec.health)",
        "Gradient norm of lora_A per layer",
        "Gradient norm of lora_B per layer",
        "Gradient norm ratio B/A per layer (clamped)",
        "Median update ratio ||dp||/||p||",
        "Top 10 Adam first-moment norms",
        "Adam second moment, median over modules",
        "Training data statistics",
    ):
        assert title in panels, title
    loss = json.dumps(panels["Loss: training and eval"]["targets"])
    assert "lora_trainer_loss" in loss and "lora_trainer_eval_loss" in loss
    assert panels["Health rules firing (thresholds: spec.health)"]["type"] == "state-timeline"
    heatmaps = [p for p in panels.values() if p["type"] == "heatmap"]
    assert len(heatmaps) >= 3
    assert all(p["options"]["calculate"] is False for p in heatmaps)
    ratio = panels["Gradient norm ratio B/A per layer (clamped)"]["targets"][0]["expr"]
    assert "lora_trainer:lora_layer_grad_norm:b_over_a" in ratio
    data_exprs = " ".join(t["expr"] for t in panels["Training data statistics"]["targets"])
    assert "lora_trainer_data_supervised_ratio" in data_exprs
    # every per-job query is filtered by the job selector
    for panel in _panels(dash):
        for target in panel.get("targets", []):
            assert '=~"$job"' in target["expr"], (panel["title"], target["expr"])


def test_operator_dashboard_panels() -> None:
    panels = {p["title"]: p for p in _panels(_load("lora-operator.json"))}
    for title in (
        "Jobs by phase",
        "Degraded jobs",
        "Degraded jobs (reason: the health rule)",
        "Degraded transitions by reason",
        "Failed /health reads by kind (per second)",
        "Reconcile duration",
    ):
        assert title in panels, title


def test_chart_dashboard_configmaps() -> None:
    values = {"grafana": {"dashboards": {"label": "my_dash", "labelValue": "yes", "folder": "ML"}}}
    cms = [
        c for c in by_kind(render(values), "ConfigMap") if "-dashboard-" in c["metadata"]["name"]
    ]
    assert len(cms) == len(DASHBOARD_FILES)
    for cm in cms:
        assert cm["metadata"]["labels"]["my_dash"] == "yes"
        assert cm["metadata"]["annotations"]["grafana_folder"] == "ML"
        ((key, text),) = cm["data"].items()
        assert json.loads(text) == _load(key)
    off = render({"grafana": {"dashboards": {"enabled": False}}})
    assert not [c for c in by_kind(off, "ConfigMap") if "-dashboard-" in c["metadata"]["name"]]
