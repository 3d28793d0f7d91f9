"""Pre-flight checks on the tiny model: `lora-train --preflight` and `lora-operator preflight`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_operator.api.constants import (
    EXIT_ERROR,
    EXIT_VERDICT_DEGRADED,
    EXIT_VERDICT_HEALTHY,
    EXIT_VERDICT_WARNING,
)
from lora_operator.cli import main as operator_main
from lora_operator.cli import preflight as operator_preflight
from tests.conftest import EXAMPLES, deep_merge

CHECKS = (
    "data: samples",
    "data: supervised tokens",
    "data: samples without supervision",
    "data: truncation",
    "rule StaticConfig",
    "rule DataQuality",
    "adapter: adapted modules",
    "adapter: trainable parameters",
    "adapter: lora_A requires_grad",
    "adapter: lora_B requires_grad",
    "steps: loss finite",
    "steps: LoRA parameters finite",
    "steps: supervised tokens per batch",
    "gradient flow: lora_B",
    "gradient flow: lora_A",
    "performance",
)


def _spec_file(tmp: Path, tiny: Any, patch: dict[str, Any], name: str = "spec.yaml") -> Path:
    body = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    text = json.dumps(body).replace("/tmp/lora-operator/tiny", str(Path(tiny.model_dir).parent))
    body = deep_merge(json.loads(text), {"spec": patch})
    path = tmp / name
    path.write_text(yaml.safe_dump(body))
    return path


def _preflight(path: Path) -> Any:
    from lora_trainer.config import load_spec
    from lora_trainer.preflight import run_preflight

    name, spec = load_spec(path)
    return run_preflight(spec, name=name)


def _check(report: Any, name: str) -> Any:
    return next(ch for ch in report.checks if ch.name == name)


@pytest.mark.training
@pytest.mark.slow
def test_quickstart_passes_with_a_row_per_check(
    tmp_path: Path, tiny_assets: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from lora_trainer.cli import main

    spec = _spec_file(tmp_path, tiny_assets, {})
    code = main(["--spec", str(spec), "--preflight", "--log-level", "WARNING"])
    table = capsys.readouterr().out
    assert code == EXIT_VERDICT_HEALTHY, table
    rows = [line for line in table.splitlines() if line.startswith("PASS")]
    for check in CHECKS:
        assert any(check in row for row in rows), (check, table)
    assert "verdict: PASS (exit 0)" in table
    assert "step 1: 0/8 non-zero (expected: B starts at 0); step 2: 8/8 non-zero" in table
    assert not (tmp_path / "out").exists() and sorted(tmp_path.iterdir()) == [spec]


@pytest.mark.training
def test_target_modules_matching_nothing_fail_naming_the_field(
    tmp_path: Path, tiny_assets: Any
) -> None:
    report = _preflight(_spec_file(tmp_path, tiny_assets, {"lora": {"targetModules": ["qkv"]}}))
    check = _check(report, "adapter: adapted modules")
    assert check.status == "fail"
    assert "spec.lora.targetModules" in check.message and "'qkv'" in check.message
    assert "q_proj" in check.message  # the model's real names, for the fix
    assert check.expected.startswith("2 (2 layers x 1 targets)")
    assert report.exit_code == EXIT_VERDICT_DEGRADED
    assert not any(ch.name.startswith(("steps:", "gradient")) for ch in report.checks)
    assert report.skipped


@pytest.mark.training
def test_fused_kernels_required_but_impossible_fail_naming_the_field(
    tmp_path: Path, tiny_assets: Any
) -> None:
    report = _preflight(
        _spec_file(tmp_path, tiny_assets, {"performance": {"fusedKernels": "liger"}})
    )
    check = _check(report, "performance")
    assert check.status == "fail" and report.exit_code == EXIT_VERDICT_DEGRADED
    assert "spec.performance.fusedKernels: liger, but" in check.message
    assert "fusedKernels: auto" in check.message  # the fix


@pytest.mark.training
def test_no_supervised_tokens_fails(tmp_path: Path, tiny_assets: Any) -> None:
    # Every sample is cut inside its long prompt: no assistant token survives maxLength 16.
    prompt = "please tell me everything about my order and the delivery " * 6
    line = {
        "conversations": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": "It ships today."},
        ]
    }
    data = tmp_path / "masked.jsonl"
    data.write_text("\n".join(json.dumps(line) for _ in range(8)) + "\n")
    patch = {"dataset": {"source": f"file://{data}", "maxLength": 16}}
    report = _preflight(_spec_file(tmp_path, tiny_assets, patch))
    assert _check(report, "data: supervised tokens").status == "fail"
    assert _check(report, "data: samples without supervision").measured == "8 of 8"
    quality = _check(report, "rule DataQuality")
    assert quality.status == "warn" and "no token of the data is supervised" in quality.measured
    assert report.exit_code == EXIT_VERDICT_DEGRADED
    assert any("no training sample has a supervised token" in s for s in report.skipped)


@pytest.mark.training
@pytest.mark.slow
def test_warmup_beyond_total_warns_through_the_static_rule(
    tmp_path: Path, tiny_assets: Any
) -> None:
    patch = {"training": {"warmup": {"steps": 500}, "maxSteps": 200, "microBatchSize": 2}}
    report = _preflight(_spec_file(tmp_path, tiny_assets, patch))
    static = _check(report, "rule StaticConfig")
    assert static.status == "warn" and "warmup 500 >= total 200 steps" in static.measured
    assert "docs/runbooks/StaticConfig.md" in static.message
    # the instrumented steps run at the peak lr: the gradient plumbing is still verified
    assert _check(report, "gradient flow: lora_A").status == "pass"
    assert report.verdict == "warn" and report.exit_code == EXIT_VERDICT_WARNING


@pytest.mark.training
@pytest.mark.slow
def test_frozen_lora_b_fails_no_gradient_flow(
    tmp_path: Path, tiny_assets: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lora_trainer.model import apply_lora as real

    def freeze_b(*args: Any) -> Any:
        model = real(*args)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.requires_grad_(False)
        return model

    monkeypatch.setattr("lora_trainer.preflight.apply_lora", freeze_b)
    report = _preflight(_spec_file(tmp_path, tiny_assets, {"training": {"microBatchSize": 2}}))
    assert _check(report, "adapter: lora_B requires_grad").status == "fail"
    flow = _check(report, "gradient flow: lora_B")
    assert flow.status == "fail" and "NoGradientFlow" in flow.message
    assert report.exit_code == EXIT_VERDICT_DEGRADED


@pytest.mark.training
@pytest.mark.slow
def test_operator_preflight_runs_the_trainer_and_prints_json(
    tmp_path: Path, tiny_assets: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _spec_file(tmp_path, tiny_assets, {"lora": {"targetModules": ["qkv"]}})
    code = operator_main(["preflight", str(spec), "--json"])
    body = json.loads(capsys.readouterr().out)
    assert code == EXIT_VERDICT_DEGRADED == body["exit_code"]
    assert body["verdict"] == "fail" and body["spec"] == str(spec)
    failed = [ch for ch in body["checks"] if ch["status"] == "fail"]
    assert [ch["name"] for ch in failed] == ["adapter: adapted modules"]
    assert "spec.lora.targetModules" in failed[0]["message"]


def test_operator_preflight_without_the_trainer_runs_the_static_checks(
    tmp_path: Path, tiny_assets: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setattr(operator_preflight, "trainer_available", lambda: False)
    ok = _spec_file(tmp_path, tiny_assets, {}, "ok.yaml")
    assert operator_main(["preflight", str(ok)]) == EXIT_VERDICT_HEALTHY
    table = capsys.readouterr().out
    assert "PASS    rule StaticConfig" in table and "not installed" in table
    lr0 = _spec_file(tmp_path, tiny_assets, {"training": {"learningRate": 0.0}}, "lr0.yaml")
    assert operator_main(["preflight", str(lr0), "--json"]) == EXIT_VERDICT_WARNING
    body = json.loads(capsys.readouterr().out)
    assert body["checks"][0]["status"] == "warn"
    assert "learningRate is 0" in body["checks"][0]["measured"]
    assert any("not installed" in note for note in body["notes"])


def test_operator_preflight_rejects_an_invalid_spec(
    tmp_path: Path, tiny_assets: Any, capsys: Any
) -> None:
    bad = _spec_file(tmp_path, tiny_assets, {"lora": {"r": 0}})
    assert operator_main(["preflight", str(bad)]) == EXIT_ERROR
    assert "spec.lora.r" in capsys.readouterr().err
