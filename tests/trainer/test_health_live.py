"""The health rules inside a real run: /health while training, verdict records in the trace,
onDegraded=Fail stops cleanly with exit 86, and a replay of the trace agrees with the run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_operator.api.constants import EXIT_HEALTH_STOP
from lora_operator.local.ports import free_port
from tests.conftest import EXAMPLES, deep_merge


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read()
    except OSError:
        return 0, b""


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory: pytest.TempPathFactory, tiny_assets: Any) -> dict[str, Any]:
    """The collapse demo (lr 1e-6) with onDegraded=Fail; /health polled while it trains."""
    tmp = tmp_path_factory.mktemp("health_live")
    tiny = str(Path(tiny_assets.model_dir).parent)
    body = yaml.safe_load((EXAMPLES / "collapse-demo.yaml").read_text())
    body = json.loads(json.dumps(body).replace("/tmp/lora-operator/tiny", tiny))
    port = free_port()
    patch = {
        "training": {"maxSteps": 150, "eval": {"everySteps": 1000}, "checkpointEverySteps": 1000},
        "monitoring": {"port": port},
        "health": {"onDegraded": "Fail"},
    }
    body = deep_merge(body, {"spec": patch})
    spec, out = tmp / "spec.yaml", tmp / "out"
    spec.write_text(yaml.safe_dump(body))
    cmd = [sys.executable, "-m", "lora_trainer", "--spec", str(spec), "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[dict[str, Any]] = []
    metrics = b""
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        code, raw = _get(f"http://127.0.0.1:{port}/health")
        if code == 200:
            seen.append(json.loads(raw))
            if seen[-1]["verdict"] != "Unknown" and not metrics:
                metrics = _get(f"http://127.0.0.1:{port}/metrics")[1]
        time.sleep(0.3)
    output, _ = proc.communicate(timeout=60)
    return {"code": proc.returncode, "log": output, "out": out, "seen": seen, "metrics": metrics}


@pytest.mark.training
@pytest.mark.slow
def test_fail_policy_checkpoints_and_exits_86(failing_run: dict[str, Any]) -> None:
    assert failing_run["code"] == EXIT_HEALTH_STOP, failing_run["log"][-3000:]
    out: Path = failing_run["out"]
    records = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    verdicts = [r for r in records if "health" in r]
    assert verdicts, "no verdict record in the trace"
    last = verdicts[-1]["health"]
    assert last["verdict"] in ("Degraded", "Critical")
    reasons = {r["rule"] for r in last["rules"]}
    assert reasons & {"LoRAGradientCollapse", "AdapterNotLearning"}, last
    assert all(r["evidence"] for r in last["rules"]), "every firing rule carries evidence"
    stop_step = max(r["step"] for r in records if "loss" in r)
    assert stop_step < 150, "stopped before its budget"
    assert (out / "checkpoints" / f"checkpoint-{stop_step}").is_dir(), "checkpoint first"
    assert "stopped at step" in failing_run["log"]


@pytest.mark.training
@pytest.mark.slow
def test_health_endpoint_and_metrics_while_training(failing_run: dict[str, Any]) -> None:
    seen = failing_run["seen"]
    assert seen, "/health never answered"
    assert {"verdict", "step", "progress", "rules", "grace_end_step"} <= set(seen[-1])
    steps = [s["step"] for s in seen]
    assert steps == sorted(steps) and steps[-1] > 0
    assert seen[0]["verdict"] in ("Unknown", "Healthy")
    assert 0 < seen[-1]["progress"] <= 1
    # what the operator copies into status.metrics / status.progress
    assert seen[-1]["metrics"]["loss"] > 0 and seen[-1]["metrics"]["tokens_per_second"] > 0
    assert seen[-1]["eta_seconds"] is not None and seen[-1]["eta_seconds"] >= 0
    assert seen[-1]["total_steps"] and seen[-1]["epoch"] is not None
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(failing_run["metrics"].decode())}
    verdict = {s.labels["verdict"]: s.value for s in fams["lora_trainer_health_verdict"].samples}
    assert sum(verdict.values()) == 1
    firing = fams["lora_trainer_health_rule_firing"].samples
    assert {s.labels["rule"] for s in firing} >= {"NonFinite", "LoRAGradientCollapse"}
    assert all(s.value in (0.0, 1.0) for s in firing)


@pytest.mark.training
@pytest.mark.slow
def test_replay_of_the_trace_agrees_with_the_run(failing_run: dict[str, Any]) -> None:
    from lora_operator.cli import main

    out: Path = failing_run["out"]
    records = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    live = [r["health"] for r in records if "health" in r]
    first_live: dict[str, int] = {}
    for report in live:
        for rule in report["rules"]:
            first_live.setdefault(rule["rule"], rule["since_step"])
    spec = out.parent / "spec.yaml"
    code = main(["health", "replay", str(out / "trace.jsonl"), "--spec", str(spec), "--json"])
    assert code == 20
    from lora_operator.health import HealthConfig, HealthEngine
    from lora_trainer.config import load_spec

    _, s = load_spec(spec)
    engine = HealthEngine(HealthConfig.from_spec(s.health, s.training, s.lora))
    engine.observe_data_stats(json.loads((out / "data_stats.json").read_text()))
    for record in records:
        engine.observe(record)
    first_replay = {
        name: st.first_firing_step
        for name, st in engine.states.items()
        if st.first_firing_step is not None and name in first_live
    }
    assert first_replay == first_live
    assert engine.verdict == live[-1]["verdict"]
