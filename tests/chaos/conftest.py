"""The fixture every chaos suite uses (the rest they share is in faults.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def tiny(tiny_assets: Any) -> Path:
    """The tiny assets' directory (model, tokenizer, data), for `faults.job_body`."""
    return Path(tiny_assets.model_dir).parent
