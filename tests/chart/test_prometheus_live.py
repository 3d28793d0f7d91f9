"""The chart's rules in a real Prometheus scraping a real (tiny, CPU) training run.

/usr/bin/prometheus runs on loopback (scrape and evaluation every 1s) with the generated rule
files and a static scrape config pointing at the trainer's /metrics. The alerts are rendered by
the same generator as files/rules/alerts.yaml with one change: every `for:` is 2s
(`alerts.prometheus_alert_groups(for_override="2s")`), since the real `for: 1m` would outlast
the run. The collapse demo (lr 1e-6) must reach LoRATrainingDegraded firing with
rule=LoRAGradientCollapse while it still trains; a healthy quickstart must fire no per-job
alert, and no recorded ratio may be NaN or Inf (lora_A gradients are exactly 0 at step 1).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_operator.local.ports import free_port
from lora_operator.observability import alerts
from tests.chart.conftest import CHART
from tests.conftest import EXAMPLES, deep_merge

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
TRAINER_ALERTS = {a.name for a in alerts.ALERTS if a.group == alerts.GROUP_TRAINER}
NAMESPACE = "live"

pytestmark = [pytest.mark.slow, pytest.mark.training]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=3) as resp:
        return json.loads(resp.read())


class Prom:
    def __init__(self, base: str) -> None:
        self.base = base

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        result: list[dict[str, Any]] = _get(url)["data"]["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = _get(f"{self.base}/api/v1/alerts")["data"]["alerts"]
        return found


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {"collapse": free_port(), "quickstart": free_port()}


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, ports: dict[str, int]) -> Iterator[Prom]:
    tmp = tmp_path_factory.mktemp("prometheus")
    (tmp / "alerts.yaml").write_text(
        yaml.safe_dump(alerts.prometheus_alert_groups(for_override="2s"))
    )
    shutil.copy(CHART / "files" / "rules" / "recording.yaml", tmp / "recording.yaml")
    targets = [
        {"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": NAMESPACE, "pod": f"{name}-0"}}
        for name, port in ports.items()
    ]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp / "alerts.yaml"), str(tmp / "recording.yaml")],
        "scrape_configs": [{"job_name": "trainers", "static_configs": targets}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "prometheus.log").open("w"),
    )
    prom = Prom(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if len(_get(f"{prom.base}/api/v1/rules")["data"]["groups"]) == 3:
                break
        except OSError:
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        raise AssertionError((tmp / "prometheus.log").read_text()[-3000:])
    yield prom
    proc.terminate()
    proc.wait(timeout=10)


def _start(
    tmp: Path, example: str, port: int, patch: dict[str, Any], tiny: str
) -> subprocess.Popen[str]:
    body = yaml.safe_load((EXAMPLES / example).read_text())
    body = json.loads(json.dumps(body).replace("/tmp/lora-operator/tiny", tiny))
    body = deep_merge(body, {"spec": deep_merge(patch, {"monitoring": {"port": port}})})
    spec, out = tmp / "spec.yaml", tmp / "out"
    spec.write_text(yaml.safe_dump(body))
    cmd = [sys.executable, "-m", "lora_trainer", "--spec", str(spec), "--output", str(out)]
    log = (tmp / "trainer.log").open("w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _nonfinite_recorded(prom: Prom) -> list[dict[str, Any]]:
    """Recorded series whose value is NaN or +-Inf."""
    found = prom.query('{__name__=~"lora_trainer:.+"}')
    return [r for r in found if not math.isfinite(float(r["value"][1]))]


def test_collapse_demo_fires_lora_training_degraded(
    prometheus: Prom, ports: dict[str, int], tiny_assets: Any, tmp_path: Path
) -> None:
    tiny = str(Path(tiny_assets.model_dir).parent)
    patch = {
        "training": {
            "maxSteps": 1000,
            "eval": {"everySteps": 10000},
            "checkpointEverySteps": 10000,
        },
        # grace ends at step 10 instead of 50: the rule fires after ~25 steps (seconds)
        "health": {"onDegraded": "Alert", "grace": {"minSteps": 10}},
    }
    proc = _start(tmp_path, "collapse-demo.yaml", ports["collapse"], patch, tiny)
    firing: list[dict[str, Any]] = []
    recorded = False
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not firing:
            time.sleep(1)
            firing = [
                a
                for a in prometheus.alerts()
                if a["labels"]["alertname"] == "LoRATrainingDegraded"
                and a["labels"].get("pod") == "collapse-0"
                and a["labels"].get("rule") == "LoRAGradientCollapse"
                and a["state"] == "firing"
            ]
            recorded = recorded or bool(prometheus.query("lora_trainer:lora_grad_norm:b_over_a"))
            assert not _nonfinite_recorded(prometheus)
        assert proc.poll() is None, "the run ended before the alert fired"
    finally:
        _stop(proc)
    log = (tmp_path / "trainer.log").read_text()
    assert firing, f"LoRATrainingDegraded never fired: {prometheus.alerts()}\n{log[-2000:]}"
    (alert,) = firing
    assert alert["labels"]["severity"] == "warning"
    assert alert["labels"]["health_severity"] == "Degraded"
    assert alert["annotations"]["runbook_url"].endswith("/docs/runbooks/LoRAGradientCollapse.md")
    assert recorded, "the B/A recording rule never produced a series"


def test_healthy_quickstart_fires_no_job_alert(
    prometheus: Prom, ports: dict[str, int], tiny_assets: Any, tmp_path: Path
) -> None:
    tiny = str(Path(tiny_assets.model_dir).parent)
    patch = {
        "training": {"maxSteps": 80, "eval": {"everySteps": 10000}, "checkpointEverySteps": 10000}
    }
    proc = _start(tmp_path, "quickstart.yaml", ports["quickstart"], patch, tiny)
    seen: list[dict[str, Any]] = []
    steps = 0.0
    evaluated = 0.0
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
            seen += [
                a
                for a in prometheus.alerts()
                if a["labels"].get("pod") == "quickstart-0"
                and a["labels"]["alertname"] in TRAINER_ALERTS
            ]
            result = prometheus.query('lora_trainer_steps_total{pod="quickstart-0"}')
            steps = max([steps, *(float(r["value"][1]) for r in result)])
            result = prometheus.query('lora_trainer_health_evaluation_step{pod="quickstart-0"}')
            evaluated = max([evaluated, *(float(r["value"][1]) for r in result)])
            assert not _nonfinite_recorded(prometheus)
        assert proc.wait(timeout=30) == 0, (tmp_path / "trainer.log").read_text()[-2000:]
    finally:
        _stop(proc)
    # the exporter closes with the run: what was scraped last, past the staleness markers
    result = prometheus.query(
        'max_over_time(lora_trainer_health_evaluation_step{pod="quickstart-0"}[10m])'
    )
    evaluated = max([evaluated, *(float(r["value"][1]) for r in result)])
    assert steps > 0, "Prometheus never scraped the quickstart run"
    assert evaluated >= 20, "the health rules never ran past the grace period"
    assert not seen, seen
