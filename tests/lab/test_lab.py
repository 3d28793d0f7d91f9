"""The failure lab (bench/lab.py): real training runs with injected failures, judged by replay.

The reduced lab runs in CI (a subset, fewer steps, one shared tiny model; <= 4 minutes on
2 cores); `make lab` runs every variant (marker lab_full) and rewrites bench/results/lab.*.
Acceptance: every failure mode is flagged at Degraded or Critical at most 50 optimizer steps
after its grace period ends (r=64 a=1 and loss on padding: at least Warning, by their
static/data rules); no healthy variant is ever Degraded or Critical.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from bench import lab

from lora_operator.api import constants as c

# Critical and static/data failures show within a few steps; the ratio/size rules need grace
# (ends at step ~11 at lr 1e-3, at step 50 for lr 1e-6) plus 3 evaluations; EvalNotImproving
# needs 3 eval records (steps 0, 25, 50); healthy runs must stay clean to the end.
REDUCED: dict[str, int] = {
    "no-gradient-flow": 20,
    "labels-masked": 20,
    "r64-a1": 20,
    "loss-on-padding": 20,
    "alpha-tiny": 50,
    "coupled-l2-decay": 50,
    "lr-1e-6": 65,
    "eval-flat": 60,
    "default": 50,
    "lr-2e-4-warmup": 50,
    "olora": 50,
    "loraplus": 50,
}
# The rule a runbook acts on: the first one to reach the expected severity.
REASONS = {
    "no-gradient-flow": c.RULE_NO_GRADIENT_FLOW,
    "labels-masked": c.RULE_NO_SUPERVISED_TOKENS,
    "r64-a1": c.RULE_STATIC_CONFIG,
    "loss-on-padding": c.RULE_DATA_QUALITY,
    "alpha-tiny": c.RULE_ADAPTER_NOT_LEARNING,
    "coupled-l2-decay": c.RULE_ADAPTER_DECAY,
    "lr-1e-6": c.RULE_LORA_GRADIENT_COLLAPSE,
    "eval-flat": c.RULE_EVAL_NOT_IMPROVING,
}
FULL_STEPS = 100


def _tiny() -> Path:
    return Path(os.environ.get("LORA_OPERATOR_TINY_DIR", "/tmp/lora-operator/tiny"))


def _check(results: list[dict[str, Any]]) -> None:
    for r in results:
        variant = lab.BY_NAME[r["name"]]
        fired = [(x["rule"], x["severity"], x["first_firing_step"]) for x in r["rules"]]
        if variant.healthy:
            assert r["verdict"] in (c.VERDICT_HEALTHY, c.VERDICT_WARNING), (r["name"], fired)
            assert r["passed"], (r["name"], fired)
            continue
        assert r["flagged_step"] is not None, (r["name"], r["verdict"], fired)
        if variant.expect == lab.DEGRADED:
            assert r["verdict"] in (c.VERDICT_DEGRADED, c.VERDICT_CRITICAL), (r["name"], fired)
            grace = r["grace_end_step"] or 0
            assert r["flagged_step"] <= grace + lab.DEADLINE_STEPS, (r["name"], grace, fired)
        else:
            assert r["verdict"] != c.VERDICT_HEALTHY, (r["name"], fired)
        assert r["passed"], (r["name"], fired)


@pytest.fixture(scope="module")
def reduced_lab(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("lab")
    return lab.run_lab(list(REDUCED), REDUCED, workdir, _tiny(), log=lambda line: None)


@pytest.mark.training
@pytest.mark.slow
def test_reduced_lab_flags_every_failure_and_no_healthy_run(
    reduced_lab: list[dict[str, Any]],
) -> None:
    assert [r["name"] for r in reduced_lab] == list(REDUCED)
    _check(reduced_lab)


@pytest.mark.training
@pytest.mark.slow
def test_reduced_lab_reasons(reduced_lab: list[dict[str, Any]]) -> None:
    """The first reason is the one a runbook can act on."""
    by_name = {r["name"]: r for r in reduced_lab}
    assert {name: by_name[name]["flagged_by"] for name in REASONS} == REASONS


def test_variants_cover_the_issue() -> None:
    """>= 10 failure modes and >= 8 healthy variants; the reduced lab is a subset."""
    assert len({v.mode for v in lab.FAILURES}) >= 10
    assert len(lab.HEALTHY_VARIANTS) >= 8
    assert set(REDUCED) <= set(lab.BY_NAME)
    assert {lab.BY_NAME[n].healthy for n in REDUCED} == {True, False}


def test_lab_switches_are_not_spec_fields(tmp_path: Path) -> None:
    """Failures the product prevents are injected by patches, never by a spec field."""
    from lora_operator.api.spec import LoRAFineTuneSpec

    for variant in lab.VARIANTS:
        body = lab.spec_body(variant, Path("/tmp/lora-operator/tiny"), tmp_path, 10)
        LoRAFineTuneSpec.model_validate(body["spec"])  # a plain, valid spec


@pytest.mark.lab_full
@pytest.mark.training
@pytest.mark.slow
def test_full_lab() -> None:
    """Every variant, FULL_STEPS steps each; rewrites bench/results/lab.json and lab.md."""
    import time

    workdir = Path(os.environ.get("LAB_WORKDIR", "/tmp/lora-operator/lab"))  # see --rejudge
    names = [v.name for v in lab.VARIANTS]
    started = time.monotonic()
    results = lab.run_lab(names, FULL_STEPS, workdir, _tiny())
    seconds = time.monotonic() - started
    lab.RESULTS.mkdir(parents=True, exist_ok=True)
    (lab.RESULTS / "lab.json").write_text(json.dumps(results, indent=2) + "\n")
    command = "make lab (pytest -m lab_full tests/lab)"
    (lab.RESULTS / "lab.md").write_text(lab.markdown(results, command, seconds, FULL_STEPS))
    _check(results)
