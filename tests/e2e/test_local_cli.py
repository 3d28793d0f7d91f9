"""`lora-operator local SPEC`: the collapse demo trained on this machine with no API: the
verdict as the exit code, the rule and its runbook named, a report written."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_operator.api import constants as c
from tests.conftest import EXAMPLES, deep_merge
from tests.e2e.cluster import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.training]


def test_local_run_of_the_collapse_demo_exits_degraded(tiny_assets: Any, tmp_path: Path) -> None:
    tiny = Path(tiny_assets.model_dir).parent
    text = (
        (EXAMPLES / "collapse-demo.yaml").read_text().replace("/tmp/lora-operator/tiny", str(tiny))
    )
    patch = {"spec": {"health": {"onDegraded": "Fail", "preflight": {"enabled": False}},
                      "output": {"uri": f"file://{tmp_path / 'out'}"}}}  # fmt: skip
    spec = tmp_path / "collapse.yaml"
    spec.write_text(yaml.safe_dump(deep_merge(yaml.safe_load(text), patch)))
    out = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "lora-operator"), "local", str(spec)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == c.EXIT_VERDICT_DEGRADED, out.stdout[-3000:] + out.stderr[-3000:]
    assert (
        "verdict: Degraded" in out.stdout and "stopped by spec.health.onDegraded=Fail" in out.stdout
    )
    assert c.RULE_LORA_GRADIENT_COLLAPSE in out.stdout
    assert f"docs/runbooks/{c.RULE_LORA_GRADIENT_COLLAPSE}.md" in out.stdout
    report = tmp_path / "out" / "report.html"
    assert report.is_file() and c.RULE_LORA_GRADIENT_COLLAPSE in report.read_text()


def test_local_refuses_an_invalid_spec_naming_the_field(tmp_path: Path) -> None:
    body = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    body["spec"]["lora"]["r"] = 0
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(body))
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "lora-operator"), "local", str(spec)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == c.EXIT_ERROR
    assert "spec.lora.r" in out.stderr
