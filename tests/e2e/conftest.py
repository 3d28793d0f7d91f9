"""End-to-end fixtures: kubectl must be installed (a skip is a failure in CI)."""

from __future__ import annotations

import pytest

from tests.e2e.cluster import KUBECTL


@pytest.fixture(autouse=True)
def _kubectl() -> None:
    if not KUBECTL.exists():
        pytest.skip("kubectl missing: bash scripts/install-tools.sh .venv")
