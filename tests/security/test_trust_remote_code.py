"""The trainer runs code shipped with a checkpoint only when spec.model.trustRemoteCode is true.

A tiny model directory whose config.json and tokenizer_config.json point (auto_map) at a
custom module that writes a marker file when imported: the trainer's loaders refuse it with
a clear error and never import the module unless the spec trusts it. The loaders run in a
subprocess (a fresh HF_HOME, no module left imported in this process).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cluster import ROOT

TRAINER_SRC = ROOT / "trainer_image" / "src" / "lora_trainer"

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from lora_operator.api.spec import ModelSpec
    from lora_trainer.model import load_base_model, load_tokenizer

    model_dir, marker = sys.argv[1], Path(sys.argv[2])
    results = {}
    for name, trust, load in (
        ("model", False, load_base_model),
        ("tokenizer", False, load_tokenizer),
        ("model trusted", True, load_base_model),  # the control: the marker does work
    ):
        spec = ModelSpec.model_validate(
            {"source": "file://" + model_dir, "trustRemoteCode": trust}
        )
        try:
            load(spec)
            error = None
        except Exception as exc:
            error = type(exc).__name__ + ": " + str(exc)
        results[name] = {"error": error, "imported": marker.exists()}
    print(json.dumps(results))
    """
)

CUSTOM = """\
from pathlib import Path

Path({marker!r}).write_text("imported")

from transformers import PretrainedConfig


class LeakcheckConfig(PretrainedConfig):
    model_type = "leakcheck-custom"
"""


def _remote_code_model(root: Path, marker: Path) -> Path:
    model = root / "model"
    model.mkdir()
    (model / "custom.py").write_text(CUSTOM.format(marker=str(marker)))
    config = {
        "model_type": "leakcheck-custom",
        "architectures": ["LeakcheckForCausalLM"],
        "auto_map": {
            "AutoConfig": "custom.LeakcheckConfig",
            "AutoModelForCausalLM": "custom.LeakcheckForCausalLM",
        },
    }
    (model / "config.json").write_text(json.dumps(config))
    tokenizer = {"auto_map": {"AutoTokenizer": ["custom.LeakcheckTokenizer", None]}}
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return model


@pytest.fixture(scope="module")
def loads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """What the trainer's loaders did with the remote-code model: error, module imported."""
    tmp = tmp_path_factory.mktemp("remote-code")
    marker = tmp / "imported-marker"
    model = _remote_code_model(tmp, marker)
    env = {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_MODULES_CACHE", None)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model), str(marker)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results: dict[str, dict[str, Any]] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


@pytest.mark.slow
def test_remote_code_is_refused_and_never_imported_unless_the_spec_trusts_it(
    loads: dict[str, dict[str, Any]],
) -> None:
    for name in ("model", "tokenizer"):
        refused = loads[name]
        assert refused["imported"] is False, (name, refused)
        assert refused["error"] is not None and "trust_remote_code" in refused["error"], refused
    assert loads["model trusted"]["imported"] is True, loads  # the marker proves an import


@pytest.mark.slow
def test_the_refusal_names_the_spec_field(loads: dict[str, dict[str, Any]]) -> None:
    for name in ("model", "tokenizer"):
        assert "spec.model.trustRemoteCode" in loads[name]["error"], loads[name]


def test_the_trainer_passes_trust_remote_code_only_from_the_spec() -> None:
    """Every trust_remote_code= in the trainer's sources is the spec's field, never a literal,
    and nothing reaches from_pretrained through **kwargs holding it."""
    calls = []
    for path in sorted(TRAINER_SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                calls.append((path.name, ast.unparse(node.value)))
            if isinstance(node, ast.Constant) and node.value == "trust_remote_code":
                calls.append((path.name, "a 'trust_remote_code' string key"))
    assert calls, "the trainer never passes trust_remote_code"
    assert {value for _, value in calls} == {"spec.trust_remote_code"}, calls


def test_trust_remote_code_is_off_unless_the_spec_says_so() -> None:
    from lora_operator.api.spec import ModelSpec

    assert ModelSpec.model_validate({"source": "hf://org/model"}).trust_remote_code is False
