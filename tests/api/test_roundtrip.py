"""Model <-> wire dict is lossless, and defaults are applied once, identically, by both."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_operator.api.crd import resource_schema
from lora_operator.api.resource import LoRAFineTune
from lora_operator.api.schema_check import apply_defaults
from tests.conftest import EXAMPLES, deep_merge

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_round_trip_is_lossless(path: Any) -> None:
    body = yaml.safe_load(path.read_text())
    first = LoRAFineTune.model_validate(body)
    wire = first.to_wire()
    second = LoRAFineTune.model_validate(wire)
    assert second == first
    assert second.to_wire() == wire


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_api_server_defaults_equal_model_defaults(path: Any) -> None:
    """What the API server stores after defaulting is what the operator's model holds."""
    body = yaml.safe_load(path.read_text())
    stored = apply_defaults(body, resource_schema())
    assert stored == LoRAFineTune.model_validate(body).to_wire()
    # defaulting an already-defaulted object changes nothing (defaults applied once)
    assert apply_defaults(stored, resource_schema()) == stored


@settings(max_examples=60, deadline=None)
@given(
    r=st.integers(1, 1024).filter(lambda r: r % 2 == 0),
    alpha=st.floats(1e-3, 1e3, allow_nan=False),
    lr=st.floats(0, 1, allow_nan=False),
    steps=st.integers(1, 10**6),
    init=st.sampled_from(["default", "gaussian", "orthogonal", "pissa", "pissa_niter_16", "olora"]),
    zero=st.none() | st.integers(0, 3),
)
def test_round_trip_property(
    quickstart_body: dict[str, Any],
    r: int,
    alpha: float,
    lr: float,
    steps: int,
    init: str,
    zero: int | None,
) -> None:
    patch: dict[str, Any] = {
        "lora": {"r": r, "alpha": alpha, "init": init},
        "training": {"learningRate": lr, "maxSteps": steps},
    }
    if zero is not None:
        patch["distributed"] = {"deepspeed": {"zeroStage": zero}}
    body = deep_merge(quickstart_body, {"spec": patch})
    model = LoRAFineTune.model_validate(body)
    assert LoRAFineTune.model_validate(model.to_wire()) == model
    assert apply_defaults(body, resource_schema()) == model.to_wire()
