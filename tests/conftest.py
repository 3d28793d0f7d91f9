"""Shared fixtures: the repository root, the examples, a valid LoRAFineTune body."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import settings

from lora_operator.api.merge import merge_patch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# CI draws the same hypothesis examples every run (a red CI is a change's doing, and it
# reproduces); on a developer's machine they stay random. The fuzz suite's own profiles:
# tests/fuzz/strategies.py.
settings.register_profile("ci-derandomized", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci-derandomized")


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """base with patch merged in (JSON merge patch: None deletes a key); base is unchanged."""
    merged: dict[str, Any] = merge_patch(base, patch)
    return merged


@pytest.fixture(scope="session")
def tiny_assets() -> Any:
    """The tiny model, tokenizer and data under $LORA_OPERATOR_TINY_DIR (default
    /tmp/lora-operator/tiny), built once and cached (`make tiny-model` builds it for CI)."""
    from lora_trainer.tiny import build_tiny_assets  # torch: only for tests that train

    return build_tiny_assets(
        Path(os.environ.get("LORA_OPERATOR_TINY_DIR", "/tmp/lora-operator/tiny"))
    )


@pytest.fixture(scope="session")
def quickstart_body() -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    return body


@pytest.fixture
def make_body(quickstart_body: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A quickstart body with a merge patch applied (under the whole object)."""

    def make(patch: dict[str, Any]) -> dict[str, Any]:
        return deep_merge(quickstart_body, patch)

    return make


# In CI a skipped test is a failure: a test skipped for a missing tool proves nothing.
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") and _skipped and exitstatus == 0:
        print(f"\nCI: {len(_skipped)} test(s) skipped; a skip is a failure in CI: {_skipped}")
        session.exitstatus = 1
