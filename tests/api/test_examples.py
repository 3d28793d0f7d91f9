"""The examples named in the architecture note exist and validate."""

from __future__ import annotations

import yaml

from lora_operator.validation import validate_file
from tests.conftest import EXAMPLES

CONTRACT = {
    "quickstart.yaml": "quickstart",
    "collapse-demo.yaml": "collapse-demo",
    "llama2-7b-8gpu.yaml": "llama2-7b-8gpu",
    "llama2-7b-2node.yaml": "llama2-7b-2node",
}


def test_every_example_validates() -> None:
    for name in CONTRACT:
        results = validate_file(EXAMPLES / name)
        assert [str(p) for r in results for p in r.problems] == [], name
        assert len(results) == 1


def test_example_names_match_the_contract() -> None:
    for file, name in CONTRACT.items():
        assert yaml.safe_load((EXAMPLES / file).read_text())["metadata"]["name"] == name


def test_field_report_job_done_right() -> None:
    spec = validate_file(EXAMPLES / "llama2-7b-8gpu.yaml")[0].resource
    assert spec is not None
    s = spec.spec
    assert (s.distributed.nodes, s.distributed.gpus_per_node) == (1, 8)
    assert s.distributed.deepspeed is not None and s.distributed.deepspeed.zero_stage == 2
    assert (s.training.precision, s.distributed.launcher) == ("bf16", "torchrun")
    two = validate_file(EXAMPLES / "llama2-7b-2node.yaml")[0].resource
    assert two is not None and two.spec.distributed.nodes == 2
    assert two.spec.distributed.deepspeed is not None
    assert two.spec.distributed.deepspeed.zero_stage == 3


def test_collapse_demo_contract() -> None:
    res = validate_file(EXAMPLES / "collapse-demo.yaml")[0].resource
    assert res is not None
    t = res.spec.training
    assert t.learning_rate == 1e-6 and t.warmup.steps == 0
    assert t.max_steps is not None and t.max_steps >= 120
    assert res.spec.health.on_degraded == "Suspend"
