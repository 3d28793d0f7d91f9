"""Trainer fixtures (the tiny assets themselves: tests/conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest

from lora_trainer.tiny import TinyAssets


@pytest.fixture
def tiny_tokenizer(tiny_assets: TinyAssets) -> Any:
    """A fresh copy of the tiny tokenizer (tests may add tokens to it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets.model_dir)
