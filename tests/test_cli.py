"""`lora-operator` as a user runs it: exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import EXAMPLES, ROOT


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lora_operator.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_validate_examples_exit_zero_with_a_summary() -> None:
    proc = run("validate", *map(str, sorted(EXAMPLES.glob("*.yaml"))))
    assert proc.returncode == 0, proc.stderr
    assert "quickstart: valid" in proc.stdout
    assert "LoRA r=16 alpha=32" in proc.stdout


def test_validate_bad_file_names_field_and_exits_one(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = (EXAMPLES / "quickstart.yaml").read_text().replace("    r: 16", "    r: 0")
    text = text.replace("maxSteps: 200", "maxSteps: 200\n    epochs: 2")
    bad.write_text(text)
    proc = run("validate", str(bad))
    assert proc.returncode == 1
    assert "spec.lora.r: must be at least 1 (got 0)" in proc.stderr
    proc = run("validate", "-o", "json", str(bad))
    report = json.loads(proc.stdout)
    assert report[0]["valid"] is False
    assert {p["field"] for p in report[0]["problems"]} == {"spec.lora.r"}


def test_validate_multi_document_and_garbage(tmp_path: Path) -> None:
    both = tmp_path / "both.yaml"
    both.write_text(
        (EXAMPLES / "quickstart.yaml").read_text()
        + "\n---\n"
        + (EXAMPLES / "collapse-demo.yaml").read_text()
    )
    assert run("validate", str(both)).returncode == 0
    junk = tmp_path / "junk.yaml"
    junk.write_text("spec: [unclosed\n")
    proc = run("validate", str(junk))
    assert proc.returncode == 1 and "not valid YAML" in proc.stderr
    proc = run("validate", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 1 and "cannot read file" in proc.stderr


def test_usage_error_exits_two() -> None:
    assert run().returncode == 2
    assert run("validate").returncode == 2
    assert run("no-such-command").returncode == 2


def test_crds_check_detects_drift(tmp_path: Path) -> None:
    assert run("crds", "--check").returncode == 0
    assert run("crds", "--dir", str(tmp_path)).returncode == 0
    target = next(tmp_path.glob("*.yaml"))
    target.write_text(target.read_text().replace("shortNames", "shortnames"))
    proc = run("crds", "--check", "--dir", str(tmp_path))
    assert proc.returncode == 1 and "make crds" in proc.stderr


def test_validate_runs_the_operators_own_checks_too(tmp_path: Path) -> None:
    """A spec that passes the API server's checks but clashes with what the operator sets is
    refused by `lora-operator validate` too, naming the field."""
    import contextlib
    import io

    import yaml

    from lora_operator.cli import main
    from tests.conftest import EXAMPLES

    body = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    body["spec"]["pod"] = {"env": [{"name": "LORA_NNODES", "value": "4"}]}
    path = tmp_path / "clash.yaml"
    path.write_text(yaml.safe_dump(body))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["validate", str(path)]) == 1
    assert "spec.pod.env[0].name" in err.getvalue() and "LORA_NNODES" in err.getvalue()
