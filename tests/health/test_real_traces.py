"""Replay real traces of the tiny model: the quickstart stays healthy, collapse-demo degrades."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_operator.api import constants as c
from tests.conftest import EXAMPLES, deep_merge

pytestmark = [pytest.mark.training, pytest.mark.slow]

# Short runs (2 cores): enough steps to pass grace (step 50) and fire (3 evaluations).
FAST = {"training": {"eval": {"everySteps": 50, "maxSamples": 8, "metrics": ["loss"]}}}


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    from lora_trainer.tiny import build_tiny_assets

    assets = build_tiny_assets(
        Path(os.environ.get("LORA_OPERATOR_TINY_DIR", "/tmp/lora-operator/tiny"))
    )
    return Path(assets.model_dir).parent


def _run(tmp: Path, tiny: Path, example: str, patch: dict[str, Any]) -> tuple[Path, Path]:
    body = yaml.safe_load((EXAMPLES / example).read_text())
    body = json.loads(json.dumps(body).replace("/tmp/lora-operator/tiny", str(tiny)))
    spec = tmp / example
    spec.write_text(yaml.safe_dump(deep_merge(body, {"spec": deep_merge(FAST, patch)})))
    out = tmp / example.removesuffix(".yaml")
    cmd = [sys.executable, "-m", "lora_trainer", "--spec", str(spec), "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return spec, out / "trace.jsonl"


def _replay(trace: Path, spec: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lora_operator.cli", "health", "replay", str(trace)]
    return subprocess.run(
        [*cmd, "--spec", str(spec), "--json"], capture_output=True, text=True, timeout=120
    )


def test_quickstart_healthy_and_collapse_demo_degraded(tmp_path: Path, tiny_dir: Path) -> None:
    spec, trace = _run(tmp_path, tiny_dir, "quickstart.yaml", {"training": {"maxSteps": 60}})
    proc = _replay(trace, spec)
    report = json.loads(proc.stdout)
    assert proc.returncode == c.EXIT_VERDICT_HEALTHY, report
    assert report["worst_verdict"] == c.VERDICT_HEALTHY and report["last_step"] == 60

    spec, trace = _run(tmp_path, tiny_dir, "collapse-demo.yaml", {"training": {"maxSteps": 70}})
    proc = _replay(trace, spec)
    report = json.loads(proc.stdout)
    assert proc.returncode == c.EXIT_VERDICT_DEGRADED, report
    assert report["verdict"] == c.VERDICT_DEGRADED
    assert report["rules"][0]["rule"] == c.RULE_LORA_GRADIENT_COLLAPSE  # the expected reason
    fired = {r["rule"]: r for r in report["rules"]}
    collapse = fired[c.RULE_LORA_GRADIENT_COLLAPSE]
    assert collapse["first_firing_step"] == 60  # grace ends at 50; 50, 55, 60 in a row
    assert collapse["evidence"]["values"]["median_ratio"] > 50
    assert c.RULE_ADAPTER_NOT_LEARNING in fired
