"""Trainer fixtures: the tiny deterministic model, tokenizer and data (built once, cached)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from lora_trainer.tiny import TinyAssets, build_tiny_assets


@pytest.fixture(scope="session")
def tiny_assets() -> TinyAssets:
    """The tiny assets under $LORA_OPERATOR_TINY_DIR (default /tmp/lora-operator/tiny)."""
    return build_tiny_assets(
        Path(os.environ.get("LORA_OPERATOR_TINY_DIR", "/tmp/lora-operator/tiny"))
    )


@pytest.fixture
def tiny_tokenizer(tiny_assets: TinyAssets) -> Any:
    """A fresh copy of the tiny tokenizer (tests may add tokens to it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets.model_dir)
