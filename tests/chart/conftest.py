"""Render the chart with the real helm (v4, .venv/bin/helm): `render(values)` -> objects.

Shared with the monitoring tests: `render(values: dict) -> list[dict]` runs `helm template`
with VALUES as a values file, as release RELEASE in NAMESPACE, with the
monitoring.coreos.com/v1 API announced (prometheus-operator present) unless
`monitoring_api=False`.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

CHART = ROOT / "charts" / "lora-operator"
HELM = ROOT / ".venv" / "bin" / "helm"
RELEASE = "lora-operator"
NAMESPACE = "lora-system"
MONITORING_API = "monitoring.coreos.com/v1"
_HOME = Path(tempfile.mkdtemp(prefix="lora-operator-helm-"))


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm offline with its cache/config/data homes in a temp directory."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(_HOME),
        "HELM_CACHE_HOME": str(_HOME / "cache"),
        "HELM_CONFIG_HOME": str(_HOME / "config"),
        "HELM_DATA_HOME": str(_HOME / "data"),
    }
    out = subprocess.run(
        [str(HELM), *args], env=env, text=True, capture_output=True, timeout=60, check=False
    )
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stderr}")
    return out


def template_args(values: dict[str, Any], *, monitoring_api: bool = True) -> list[str]:
    """`helm template` arguments for VALUES (written to a values file; JSON is YAML)."""
    handle, path = tempfile.mkstemp(suffix=".yaml", dir=_HOME)
    with os.fdopen(handle, "w") as fh:
        json.dump(values, fh)
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", path]
    return [*args, *(["--api-versions", MONITORING_API] if monitoring_api else [])]


@functools.cache
def _render(values_json: str, monitoring_api: bool) -> str:
    return helm(*template_args(json.loads(values_json), monitoring_api=monitoring_api)).stdout


def render(values: dict[str, Any], *, monitoring_api: bool = True) -> list[dict[str, Any]]:
    """The chart's objects for VALUES (documents in helm's order, empty ones dropped)."""
    text = _render(json.dumps(values, sort_keys=True), monitoring_api)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = by_kind(objs, kind)
    return found
