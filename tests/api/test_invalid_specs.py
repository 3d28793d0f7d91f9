"""Bad specs are rejected with a message that names the field and says what to do."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from lora_operator.validation import validate_body

S = "spec"
# (patch on the quickstart body, field path the first problem must name, words in the message)
INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    ("missing model", {S: {"model": None}}, "spec.model", "required"),
    ("missing dataset", {S: {"dataset": None}}, "spec.dataset", "required"),
    ("missing output", {S: {"output": None}}, "spec.output", "required"),
    ("model uri scheme", {S: {"model": {"source": "s3://b/m"}}}, "spec.model.source", "must match"),
    ("data uri hf", {S: {"dataset": {"source": "hf://d/x"}}}, "spec.dataset.source", "must match"),
    ("output uri", {S: {"output": {"uri": "/tmp/out"}}}, "spec.output.uri", "must match"),
    ("dtype", {S: {"model": {"dtype": "int4"}}}, "spec.model.dtype", "must be one of"),
    ("r zero", {S: {"lora": {"r": 0}}}, "spec.lora.r", "at least 1"),
    ("r string", {S: {"lora": {"r": "sixteen"}}}, "spec.lora.r", "type integer"),
    ("alpha zero", {S: {"lora": {"alpha": 0}}}, "spec.lora", "alpha must be > 0"),
    ("dropout one", {S: {"lora": {"dropout": 1.0}}}, "spec.lora.dropout", "at most"),
    ("no targets", {S: {"lora": {"targetModules": []}}}, "spec.lora.targetModules", "at least"),
    ("odd orthogonal", {S: {"lora": {"init": "orthogonal", "r": 7}}}, "spec.lora.r", "even r"),
    ("init eva", {S: {"lora": {"init": "eva"}}}, "spec.lora.init", "data-driven"),
    ("init loftq", {S: {"lora": {"init": "loftq"}}}, "spec.lora.init", "quantized"),
    ("init mica", {S: {"lora": {"init": "mica"}}}, "spec.lora.init", "freezes lora_B"),
    ("init unknown", {S: {"lora": {"init": "xavier"}}}, "spec.lora.init", "must match"),
    (
        "lora+ with dora",
        {S: {"lora": {"loraPlusLrRatio": 16, "useDora": True}}},
        "spec.lora",
        "cannot be combined",
    ),
    ("epochs and steps", {S: {"training": {"epochs": 3}}}, "spec.training", "exactly one"),
    (
        "neither epochs nor steps",
        {S: {"training": {"maxSteps": None}}},
        "spec.training",
        "exactly one",
    ),
    (
        "negative lr",
        {S: {"training": {"learningRate": -1e-4}}},
        "spec.training.learningRate",
        "at least 0",
    ),
    (
        "warmup both",
        {S: {"training": {"warmup": {"ratio": 0.1, "steps": 5}}}},
        "spec.training.warmup",
        "not both",
    ),
    ("precision", {S: {"training": {"precision": "int8"}}}, "spec.training.precision", "one of"),
    (
        "eval metric",
        {S: {"training": {"eval": {"metrics": ["accuracy"]}}}},
        "spec.training.eval.metrics[0]",
        "one of",
    ),
    (
        "micro batch 0",
        {S: {"training": {"microBatchSize": 0}}},
        "spec.training.microBatchSize",
        "at least 1",
    ),
    (
        "no gpus on cuda",
        {S: {"distributed": {"device": "cuda", "gpusPerNode": 0}}},
        "spec.distributed.gpusPerNode",
        "gpusPerNode >= 1",
    ),
    (
        "processes on cuda",
        {S: {"distributed": {"device": "cuda", "gpusPerNode": 1, "processesPerNode": 2}}},
        "spec.distributed.processesPerNode",
        "device cpu",
    ),
    (
        "zero stage 4",
        {S: {"distributed": {"deepspeed": {"zeroStage": 4}}}},
        "spec.distributed.deepspeed.zeroStage",
        "at most 3",
    ),
    (
        "param offload on zero2",
        {S: {"distributed": {"deepspeed": {"zeroStage": 2, "offloadParams": True}}}},
        "spec.distributed.deepspeed.offloadParams",
        "zeroStage 3",
    ),
    (
        "launcher",
        {S: {"distributed": {"launcher": "mpirun"}}},
        "spec.distributed.launcher",
        "one of",
    ),
    (
        "multi-node file output",
        {
            S: {
                "distributed": {"nodes": 2},
                "dataset": {"source": "pvc://d/train.jsonl", "evalSource": None},
            }
        },
        "spec.output.uri",
        "pvc://",
    ),
    ("eval both", {S: {"dataset": {"evalSplit": 0.1}}}, "spec.dataset", "not both"),
    (
        "token for file model",
        {S: {"model": {"tokenSecretRef": {"name": "t", "key": "k"}}}},
        "spec.model.tokenSecretRef",
        "hf://",
    ),
    ("on degraded", {S: {"health": {"onDegraded": "Panic"}}}, "spec.health.onDegraded", "one of"),
    (
        "unknown rule",
        {S: {"health": {"rules": [{"name": "LossIsHigh"}]}}},
        "spec.health.rules[0].name",
        "one of",
    ),
    (
        "stall too short",
        {S: {"health": {"stallTimeoutSeconds": 5}}},
        "spec.health.stallTimeoutSeconds",
        "at least 60",
    ),
    ("port", {S: {"monitoring": {"port": 80}}}, "spec.monitoring.port", "at least 1024"),
    (
        "env secret inline",
        {S: {"pod": {"env": [{"name": "HF_TOKEN"}]}}},
        "spec.pod.env[0]",
        "secretKeyRef",
    ),
    ("unknown field typo", {S: {"lora": {"rank": 8}}}, "spec.lora.rank", "did you mean r"),
    ("unknown top field", {S: {"trainig": {}}}, "spec.trainig", "did you mean training"),
    ("name too long", {"metadata": {"name": "x" * 60}}, "metadata.name", "at most 52"),
    ("name uppercase", {"metadata": {"name": "Quick"}}, "metadata.name", "DNS-1035"),
    ("wrong kind", {"kind": "TrainJob"}, "kind", "LoRAFineTune"),
    ("wrong version", {"apiVersion": "lora-operator.dev/v1"}, "apiVersion", "v1alpha1"),
    (
        "negative ttl",
        {S: {"runPolicy": {"ttlSecondsAfterFinished": -1}}},
        "spec.runPolicy.ttlSecondsAfterFinished",
        "at least 0",
    ),
]


@pytest.mark.parametrize(
    ("patch", "field", "words"),
    [pytest.param(p, f, w, id=i) for i, p, f, w in INVALID],
)
def test_invalid_spec_is_rejected_naming_the_field(
    make_body: Callable[[dict[str, Any]], dict[str, Any]],
    patch: dict[str, Any],
    field: str,
    words: str,
) -> None:
    result = validate_body(make_body(patch))
    assert not result.ok, "an invalid spec was accepted"
    assert any(p.path == field and words in p.message for p in result.problems), [
        str(p) for p in result.problems
    ]


def test_table_covers_enough_cases() -> None:
    assert len(INVALID) >= 25


def test_quickstart_base_is_valid(make_body: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    assert validate_body(make_body({})).problems == []


def test_not_a_mapping() -> None:
    assert not validate_body(["a", "list"]).ok
