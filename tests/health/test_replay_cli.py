"""`lora-operator health replay` as a user runs it: output, exit codes, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_operator.api import constants as c
from lora_operator.cli import main
from tests.conftest import EXAMPLES, deep_merge
from tests.health.streams import telemetry, trace


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _collapse(step: int) -> dict[str, Any]:
    return telemetry(step, lr=1e-6, grad_a=1e-4, grad_b=0.05)


def _replay(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["health", "replay", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_healthy_trace_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _replay(capsys, str(_write(tmp_path / "t.jsonl", trace(100))))
    assert code == c.EXIT_VERDICT_HEALTHY
    assert "verdict: Healthy" in out and "no rule fired" in out


def test_warning_trace_exits_ten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = trace(30, loss_at=lambda s: "NaN" if s == 12 else 2.0)
    code, out, _ = _replay(capsys, str(_write(tmp_path / "t.jsonl", records)))
    assert code == c.EXIT_VERDICT_WARNING
    assert "NaNLossBatch (Warning): first firing at step 20" in out


def test_degraded_trace_exits_twenty_with_timeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "t.jsonl", trace(100, lr=1e-6, telemetry_at=_collapse))
    code, out, _ = _replay(capsys, str(path))  # default interval 10: judged at 50, 60, 70
    assert code == c.EXIT_VERDICT_DEGRADED
    assert "LoRAGradientCollapse (Degraded): first firing at step 70" in out
    assert "worst: layer" in out
    code, out, _ = _replay(capsys, str(path), "--json")
    report = json.loads(out)
    assert report["worst_verdict"] == c.VERDICT_DEGRADED
    assert report["rules"][0]["first_firing_step"] == 70
    assert report["transitions"][-1]["verdict"] == c.VERDICT_DEGRADED


def test_critical_trace_exits_twenty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = trace(10, telemetry_at=lambda s: telemetry(s, grad_a=None, grad_b=None))
    code, out, _ = _replay(capsys, str(_write(tmp_path / "t.jsonl", records)))
    assert code == c.EXIT_VERDICT_DEGRADED
    assert "verdict: Critical" in out and "NoGradientFlow" in out


def test_spec_sets_interval_and_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "t.jsonl", trace(100, lr=1e-6, telemetry_at=_collapse))
    body = yaml.safe_load((EXAMPLES / "collapse-demo.yaml").read_text())
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(body))
    code, out, _ = _replay(capsys, str(path), "--spec", str(spec))
    assert code == c.EXIT_VERDICT_DEGRADED
    assert "first firing at step 60" in out  # evaluationIntervalSteps 5 from the spec
    off = {"spec": {"health": {"rules": [{"name": "LoRAGradientCollapse", "enabled": False}]}}}
    spec.write_text(yaml.safe_dump(deep_merge(body, off)))
    assert _replay(capsys, str(path), "--spec", str(spec))[0] == c.EXIT_VERDICT_HEALTHY


def test_malformed_lines_are_skipped_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "t.jsonl", trace(20))
    lines = path.read_bytes().splitlines()
    lines[2] = b"{not json"
    lines[4] = b"\xff\xfe"
    path.write_bytes(b"\n".join(lines) + b"\n")
    code, _, err = _replay(capsys, str(path))
    assert code == c.EXIT_VERDICT_HEALTHY
    assert f"{path}:3: skipped: not JSON" in err
    assert f"{path}:5: skipped: not UTF-8 text" in err


def test_unreadable_input_exits_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _replay(capsys, str(tmp_path / "missing.jsonl"))
    assert code == c.EXIT_USAGE and "cannot read" in err and "missing.jsonl" in err
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("hello\n[1, 2]\n")
    code, _, err = _replay(capsys, str(garbage))
    assert code == c.EXIT_USAGE
    assert "no training records" in err and f"{garbage}:1: skipped: not JSON" in err


def test_invalid_spec_exits_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "t.jsonl", trace(20))
    spec = tmp_path / "spec.yaml"
    body = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    spec.write_text(yaml.safe_dump(deep_merge(body, {"spec": {"lora": {"r": 0}}})))
    code, _, err = _replay(capsys, str(path), "--spec", str(spec))
    assert code == c.EXIT_USAGE and "spec.lora.r" in err


def test_data_stats_next_to_the_trace_are_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "trace.jsonl", trace(20))
    (tmp_path / "data_stats.json").write_text(json.dumps({"pad_label_fraction": 0.3}))
    code, out, _ = _replay(capsys, str(path))
    assert code == c.EXIT_VERDICT_WARNING and "DataQuality" in out
