"""DeepSpeed ZeRO-2/3 and torchrun over 2 CPU processes, through `lora-train launch`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import EXAMPLES, deep_merge

pytestmark = [pytest.mark.training, pytest.mark.slow]


def _launch(tmp: Path, tiny_dir: Path, distributed: dict[str, Any]) -> tuple[Path, str]:
    body = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    body = json.loads(json.dumps(body).replace("/tmp/lora-operator/tiny", str(tiny_dir)))
    patch = {
        "training": {"maxSteps": 6, "eval": {"everySteps": 100, "metrics": ["loss"]}},
        "distributed": {"device": "cpu", "gpusPerNode": 0, "processesPerNode": 2, **distributed},
    }
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump(deep_merge(body, {"spec": patch})))
    out = tmp / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_trainer",
            "launch",
            "--nproc-per-node",
            "2",
            "--",
            "--spec",
            str(spec),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out, proc.stdout + proc.stderr


def _eval_loss(out: Path) -> float:
    loss: float = json.loads((out / "summary.json").read_text())["final"]["eval_loss"]
    return loss


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory: pytest.TempPathFactory, tiny_assets: Any) -> dict[str, Path]:
    tiny = Path(tiny_assets.model_dir).parent
    runs = {}
    for name, dist in {
        "zero2": {"deepspeed": {"zeroStage": 2}},
        "zero3": {"deepspeed": {"zeroStage": 3}},
    }.items():
        runs[name], _ = _launch(tmp_path_factory.mktemp(name), tiny, dist)
    return runs


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_two_ranks_train_and_only_rank_zero_writes(zero_runs: dict[str, Path], name: str) -> None:
    out = zero_runs[name]
    records = [json.loads(x) for x in (out / "trace.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6], "each step must be written once (rank 0 only)"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    train = [r for r in records if "loss" in r]
    assert 0 < train[0]["tokens"] < train[-1]["tokens"]


def test_zero_stages_agree(zero_runs: dict[str, Path]) -> None:
    """Same data, same seed: ZeRO-2 and ZeRO-3 end at the same eval loss (fp32 tolerance)."""
    assert abs(_eval_loss(zero_runs["zero2"]) - _eval_loss(zero_runs["zero3"])) < 1e-3
