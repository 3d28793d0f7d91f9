"""Real training of the tiny model on CPU through `lora-train`, as a pod runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import EXAMPLES, deep_merge

pytestmark = [pytest.mark.training, pytest.mark.slow]


def _spec_file(tmp: Path, tiny_dir: Path, patch: dict[str, Any]) -> Path:
    body = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    text = json.dumps(body).replace("/tmp/lora-operator/tiny", str(tiny_dir))
    body = deep_merge(json.loads(text), {"spec": patch})
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _train(spec: Path, out: Path, **kw: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lora_trainer", "--spec", str(spec), "--output", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        **kw,
    )


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory, tiny_assets: Any) -> Path:
    """One quickstart run shared by every test that only reads its outputs."""
    tmp = tmp_path_factory.mktemp("quickstart")
    spec = _spec_file(tmp, Path(tiny_assets.model_dir).parent, {})
    proc = _train(spec, tmp / "out")
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return tmp / "out"


def test_quickstart_improves_eval_loss_bleu_and_rouge(quickstart_run: Path) -> None:
    summary = json.loads((quickstart_run / "summary.json").read_text())
    base, final = summary["baseline"], summary["final"]
    # Gains over seeds 42/1/2 (closing note of the trainer issue): eval loss 4.665/4.661/4.647,
    # BLEU 62.3/56.6/55.3, ROUGE-L 0.689/0.629/0.608. Each margin is >= 5x that spread
    # (0.018, 7.0, 0.081) and below the smallest gain measured.
    assert base["eval_loss"] - final["eval_loss"] > 4.0, (base, final)
    assert final["eval_bleu"] - base["eval_bleu"] > 40.0, (base, final)
    assert final["eval_rougeL"] - base["eval_rougeL"] > 0.45, (base, final)


def test_trace_has_one_record_per_step_with_schema(quickstart_run: Path) -> None:
    records = [json.loads(x) for x in (quickstart_run / "trace.jsonl").read_text().splitlines()]
    assert all(r["schema"] == 1 for r in records)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))
    assert all({"lr", "grad_norm", "tokens", "step_time"} <= set(r) for r in train)
    assert train[-1]["tokens"] > train[0]["tokens"] > 0
    evals = [r for r in records if "eval_loss" in r]
    assert evals[0]["step"] == 0 and len(evals) >= 3


def test_data_statistics_written(quickstart_run: Path) -> None:
    stats = json.loads((quickstart_run / "data_stats.json").read_text())
    assert stats["samples"] > 0
    assert 0.0 < stats["supervised_fraction"] < 1.0
    assert stats["samples_without_supervision"] == 0
    assert stats["pad_label_fraction"] == 0.0  # no loss on padding, ever


def test_summary_records_the_performance_plan(quickstart_run: Path) -> None:
    plan = json.loads((quickstart_run / "summary.json").read_text())["performance"]
    # the quickstart trains in fp32 on CPU: no autocast to skip casts for, no Triton kernels
    assert plan["adapter_fast_path"] is False and plan["fused_kernels"] is False
    assert plan["kernels_note"].startswith("off: ")
    assert plan["decoder_layers"] >= 1 and plan["checkpointed_layers"] == 0


def test_adapter_reloads_to_the_same_eval_loss(quickstart_run: Path, tiny_assets: Any) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_operator.api.spec import DatasetSpec
    from lora_trainer.data import Collator, load_dataset, prepare_tokenizer

    summary = json.loads((quickstart_run / "summary.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_assets.model_dir)
    prepare_tokenizer(tok, "tokenizer")
    base = AutoModelForCausalLM.from_pretrained(tiny_assets.model_dir)
    model = PeftModel.from_pretrained(base, str(quickstart_run / "adapter")).eval()
    ds = DatasetSpec(
        source=f"file://{tiny_assets.train_path}",
        eval_source=f"file://{tiny_assets.eval_path}",
        max_length=256,
    )
    data = load_dataset(ds, tok, lambda uri: Path(uri.removeprefix("file://")))
    collate = Collator(tok.pad_token_id)
    # the trainer's eval loss: mean over eval batches (micro-batch 8) of each batch's loss
    losses = []
    with torch.no_grad():
        for start in range(0, len(data.eval), 8):
            batch = collate(list(data.eval[start : start + 8]))
            losses.append(model(**batch).loss.item())
    assert abs(sum(losses) / len(losses) - summary["final"]["eval_loss"]) < 1e-3


RESUME_PATCH = {
    "training": {"maxSteps": 30, "eval": {"metrics": ["loss"], "everySteps": 100}},
}


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (out / "trace.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _wait_for_steps(trace: Path, n: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if trace.exists() and sum('"loss"' in x for x in trace.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"{trace} never reached {n} steps")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_assets: Any) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    spec = _spec_file(
        tmp,
        Path(tiny_assets.model_dir).parent,
        deep_merge(RESUME_PATCH, {"training": {"checkpointEverySteps": 100}}),
    )
    log, _ = _train(spec, tmp / "out").communicate(timeout=300)
    return tmp / "out"


@pytest.mark.parametrize(("sig", "every"), [(signal.SIGTERM, 100), (signal.SIGKILL, 10)])
def test_killed_trainer_resumes_exactly_where_it_stopped(
    tmp_path: Path, tiny_assets: Any, uninterrupted: Path, sig: int, every: int
) -> None:
    """SIGTERM writes a checkpoint at once; SIGKILL loses at most checkpointEverySteps."""
    patch = deep_merge(RESUME_PATCH, {"training": {"checkpointEverySteps": every}})
    spec = _spec_file(tmp_path, Path(tiny_assets.model_dir).parent, patch)
    out = tmp_path / "out"
    proc = _train(spec, out)
    _wait_for_steps(out / "trace.jsonl", 13)
    proc.send_signal(sig)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == (128 + sig if sig == signal.SIGTERM else -sig), log[-3000:]
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, "no checkpoint to resume from"
    resumed_at = int(checkpoints[-1].name.split("-")[1])
    done = max(_losses(out))  # the last step the killed run logged
    if sig == signal.SIGTERM:
        assert resumed_at == done >= 13  # checkpointed at the step it stopped
    else:
        assert resumed_at % every == 0 and 0 <= done - resumed_at <= every
    log, _ = _train(spec, out).communicate(timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"checkpoint-{resumed_at}"), log[-3000:]
    assert summary["steps"] == 30
    # step counter, optimizer state, RNG and data position all continue: every step after
    # the checkpoint has the loss an uninterrupted run has at that step
    reference, resumed = _losses(uninterrupted), _losses(out)
    for step in range(resumed_at + 1, 31):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5), step


def test_bad_inputs_fail_fast_naming_the_input(tmp_path: Path, tiny_assets: Any) -> None:
    spec = _spec_file(
        tmp_path,
        Path(tiny_assets.model_dir).parent,
        {"dataset": {"source": "file:///nonexistent/train.jsonl"}},
    )
    proc = _train(spec, tmp_path / "out")
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "/nonexistent/train.jsonl" in log
    spec = _spec_file(
        tmp_path, Path(tiny_assets.model_dir).parent, {"model": {"source": f"file://{tmp_path}"}}
    )
    proc = _train(spec, tmp_path / "out")
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "has no config.json" in log
    spec = _spec_file(
        tmp_path,
        Path(tiny_assets.model_dir).parent,
        {"lora": {"targetModules": ["q_proj", "qkv_proj"]}},
    )
    proc = _train(spec, tmp_path / "out")
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "'qkv_proj' matches no linear module" in log
