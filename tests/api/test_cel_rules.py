"""Every CEL rule of the CRD has a case it accepts and a case it rejects (via cel-python)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from lora_operator.api.crd import resource_schema
from lora_operator.validation import validate_body

S = "spec"
PVC = {
    "dataset": {"source": "pvc://d/t.jsonl", "evalSource": "pvc://d/e.jsonl"},
    "output": {"uri": "pvc://o/run"},
}
# rule text -> (patch the rule accepts, patch the rule rejects)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "size(self.metadata.name) <= 52": (
        {"metadata": {"name": "a" * 52}},
        {"metadata": {"name": "a" * 53}},
    ),
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')": (
        {"metadata": {"name": "a-1"}},
        {"metadata": {"name": "1-a"}},
    ),
    "self.distributed.nodes == 1 || !self.output.uri.startsWith('file://')": (
        {S: {"distributed": {"nodes": 2}, **PVC}},
        {S: {"distributed": {"nodes": 2}, **PVC, "output": {"uri": "file:///o"}}},
    ),
    "self.distributed.nodes == 1 || !self.dataset.source.startsWith('file://')": (
        {S: {"distributed": {"nodes": 2}, **PVC}},
        {
            S: {
                "distributed": {"nodes": 2},
                **PVC,
                "dataset": {"source": "file:///t.jsonl", "evalSource": "pvc://d/e.jsonl"},
            }
        },
    ),
    "!has(self.tokenSecretRef) || self.source.startsWith('hf://')": (
        {S: {"model": {"source": "hf://o/m", "tokenSecretRef": {"name": "s", "key": "k"}}}},
        {S: {"model": {"tokenSecretRef": {"name": "s", "key": "k"}}}},
    ),
    "!has(self.revision) || self.source.startsWith('hf://')": (
        {S: {"model": {"source": "hf://o/m", "revision": "main"}}},
        {S: {"model": {"revision": "main"}}},
    ),
    "!(has(self.evalSource) && has(self.evalSplit))": (
        {S: {"dataset": {"evalSource": None, "evalSplit": 0.1}}},
        {S: {"dataset": {"evalSplit": 0.1}}},
    ),
    "self.alpha > 0.0": ({S: {"lora": {"alpha": 0.5}}}, {S: {"lora": {"alpha": -1}}}),
    "self.init != 'orthogonal' || self.r % 2 == 0": (
        {S: {"lora": {"init": "orthogonal", "r": 8}}},
        {S: {"lora": {"init": "orthogonal", "r": 9}}},
    ),
    "!(self.init in ['eva', 'corda'])": (
        {S: {"lora": {"init": "pissa_niter_4"}}},
        {S: {"lora": {"init": "corda"}}},
    ),
    "self.init != 'loftq'": ({S: {"lora": {"init": "olora"}}}, {S: {"lora": {"init": "loftq"}}}),
    "self.init != 'lora_ga'": (
        {S: {"lora": {"init": "pissa"}}},
        {S: {"lora": {"init": "lora_ga"}}},
    ),
    "self.init != 'mica'": ({S: {"lora": {"init": "gaussian"}}}, {S: {"lora": {"init": "mica"}}}),
    "!has(self.loraPlusLrRatio) || !self.useDora": (
        {S: {"lora": {"loraPlusLrRatio": 16}}},
        {S: {"lora": {"loraPlusLrRatio": 16, "useDora": True}}},
    ),
    "!(has(self.ratio) && has(self.steps))": (
        {S: {"training": {"warmup": {"steps": None, "ratio": 0.1}}}},
        {S: {"training": {"warmup": {"ratio": 0.1}}}},
    ),
    "has(self.epochs) != has(self.maxSteps)": (
        {S: {"training": {"maxSteps": None, "epochs": 2}}},
        {S: {"training": {"epochs": 2}}},
    ),
    "!self.offloadParams || self.zeroStage == 3": (
        {S: {"distributed": {"deepspeed": {"zeroStage": 3, "offloadParams": True}}}},
        {S: {"distributed": {"deepspeed": {"zeroStage": 1, "offloadParams": True}}}},
    ),
    "!self.offloadOptimizer || self.zeroStage >= 1": (
        {S: {"distributed": {"deepspeed": {"zeroStage": 1, "offloadOptimizer": True}}}},
        {S: {"distributed": {"deepspeed": {"zeroStage": 0, "offloadOptimizer": True}}}},
    ),
    "self.device == 'cpu' || self.nodes * self.gpusPerNode >= 1": (
        {S: {"distributed": {"device": "cuda", "gpusPerNode": 2}}},
        {S: {"distributed": {"device": "cuda", "gpusPerNode": 0}}},
    ),
    "!has(self.processesPerNode) || self.device == 'cpu'": (
        {S: {"distributed": {"device": "cpu", "processesPerNode": 2}}},
        {S: {"distributed": {"device": "cuda", "gpusPerNode": 1, "processesPerNode": 2}}},
    ),
    "has(self.value) != has(self.secretKeyRef)": (
        {S: {"pod": {"env": [{"name": "T", "secretKeyRef": {"name": "s", "key": "k"}}]}}},
        {
            S: {
                "pod": {
                    "env": [{"name": "T", "value": "v", "secretKeyRef": {"name": "s", "key": "k"}}]
                }
            }
        },
    ),
}


def _all_rules(node: dict[str, Any]) -> dict[str, str]:
    rules = {r["rule"]: r["message"] for r in node.get("x-kubernetes-validations", [])}
    for sub in node.get("properties", {}).values():
        rules |= _all_rules(sub)
    if isinstance(node.get("items"), dict):
        rules |= _all_rules(node["items"])
    return rules


RULES = _all_rules(resource_schema())


def test_every_cel_rule_has_cases() -> None:
    assert sorted(RULES) == sorted(CASES)


@pytest.mark.parametrize("rule", sorted(CASES))
def test_cel_rule_accepts_and_rejects(
    make_body: Callable[[dict[str, Any]], dict[str, Any]], rule: str
) -> None:
    good, bad = CASES[rule]
    message = RULES[rule]
    accepted = validate_body(make_body(good))
    assert accepted.ok, [str(p) for p in accepted.problems]
    rejected = validate_body(make_body(bad))
    assert message in [p.message for p in rejected.problems], [str(p) for p in rejected.problems]


def test_models_enforce_the_same_rules(
    make_body: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    """The operator's parse (pydantic) rejects what the CRD's CEL rejects, for every rule."""
    from pydantic import ValidationError

    from lora_operator.api.resource import LoRAFineTune

    for rule, (_, bad) in CASES.items():
        if "metadata" in rule:
            continue  # metadata.name is checked by ObjectMeta's own constraints
        with pytest.raises(ValidationError) as err:
            LoRAFineTune.model_validate(make_body(bad))
        assert RULES[rule] in str(err.value), rule
