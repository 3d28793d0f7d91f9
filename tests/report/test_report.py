"""`lora-operator report` on real traces of the tiny model: a healthy quickstart run and the
collapse demo (lr 1e-6, no warmup), both trained once for the module, side by side."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from matplotlib import image

from lora_operator.api import constants as c
from lora_operator.cli import main
from lora_operator.report import FILES, REPORT_HTML, Report, render
from tests.conftest import EXAMPLES, deep_merge

pytestmark = [pytest.mark.training, pytest.mark.slow]

# Short evaluations (8 samples, 16 new tokens) every 10 steps, with BLEU and ROUGE-L.
EVAL = {
    "everySteps": 10,
    "maxSamples": 8,
    "maxNewTokens": 16,
    "metrics": ["loss", "bleu", "rougeL"],
}
HEALTHY = {"training": {"maxSteps": 40, "eval": EVAL, "checkpointEverySteps": 1000}}
# Grace ends at step 50; LoRAGradientCollapse needs 3 evaluations in a row: 50, 55, 60.
COLLAPSE = {"training": {"maxSteps": 65, "eval": EVAL, "checkpointEverySteps": 1000}}
MIN_PNG_BYTES = 10_000
MIN_PIXEL_VARIANCE = 1e-3


@dataclass(frozen=True)
class Runs:
    healthy: Path
    collapse: Path
    collapse_spec: Path


def _start(tmp: Path, tiny: Path, example: str, patch: dict[str, Any]) -> tuple[Path, Any]:
    body = yaml.safe_load((EXAMPLES / example).read_text())
    body = json.loads(json.dumps(body).replace("/tmp/lora-operator/tiny", str(tiny)))
    spec = tmp / example
    spec.write_text(yaml.safe_dump(deep_merge(body, {"spec": patch})))
    out = tmp / example.removesuffix(".yaml")
    cmd = [sys.executable, "-m", "lora_trainer", "--spec", str(spec), "--output", str(out)]
    return spec, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_assets: Any) -> Runs:
    tmp = tmp_path_factory.mktemp("report-runs")
    tiny = Path(tiny_assets.model_dir).parent
    started = [
        _start(tmp, tiny, "quickstart.yaml", HEALTHY),
        _start(tmp, tiny, "collapse-demo.yaml", COLLAPSE),
    ]
    for _, proc in started:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
    return Runs(tmp / "quickstart", tmp / "collapse-demo", started[1][0])


@pytest.fixture(scope="module")
def healthy(runs: Runs, tmp_path_factory: pytest.TempPathFactory) -> Report:
    return render(runs.healthy, tmp_path_factory.mktemp("healthy-report"))


@pytest.fixture(scope="module")
def collapse(runs: Runs) -> Report:
    return render(runs.collapse)  # next to the trace, as `lora-operator report DIR` does


def _collapse_verdict(trace: Path) -> dict[str, Any]:
    for line in trace.read_text().splitlines():
        health = json.loads(line).get("health")
        if health and any(r["rule"] == c.RULE_LORA_GRADIENT_COLLAPSE for r in health["rules"]):
            rule: dict[str, Any] = next(
                r for r in health["rules"] if r["rule"] == c.RULE_LORA_GRADIENT_COLLAPSE
            )
            return rule
    raise AssertionError(f"{trace}: LoRAGradientCollapse never fired")


@pytest.mark.parametrize("which", ["healthy", "collapse"])
def test_every_figure_is_a_real_picture_linked_from_the_page(
    which: str, request: pytest.FixtureRequest
) -> None:
    report: Report = request.getfixturevalue(which)
    page = report.html.read_text()
    for name in FILES:
        png = report.html.parent / name
        assert png.stat().st_size > MIN_PNG_BYTES, png
        pixels = image.imread(png)
        assert pixels.shape[:2] == (600, 1200), png
        assert float(np.var(pixels[..., :3])) > MIN_PIXEL_VARIANCE, f"{png} looks blank"
        assert f'src="{name}"' in page, name
    assert "<h2>Final metrics</h2>" in page and "baseline (step 0)" in page


def test_healthy_run_says_healthy(healthy: Report) -> None:
    page = healthy.html.read_text()
    assert re.search(r"<h1 class=\"ok\">Healthy: no rule fired</h1>", page)
    assert healthy.run.health.main_finding is None
    assert (
        healthy.run.summary is not None and healthy.run.last_step == HEALTHY["training"]["maxSteps"]
    )


def test_collapse_report_names_the_rule_and_step(collapse: Report, runs: Runs) -> None:
    rule = _collapse_verdict(runs.collapse / "trace.jsonl")
    step = rule["since_step"]
    headline = f"{c.RULE_LORA_GRADIENT_COLLAPSE} from step {step}: median ||grad B||/||grad A||"
    assert step == 60
    assert headline in collapse.run.health.headline
    assert f'<h1 class="bad">{headline}' in collapse.html.read_text()
    assert collapse.html.parent == runs.collapse


def test_collapse_heatmap_shows_the_ratio_the_rule_reported(collapse: Report, runs: Runs) -> None:
    rule = _collapse_verdict(runs.collapse / "trace.jsonl")
    reported = rule["evidence"]["values"]["median_ratio"]
    plotted = collapse.grad_ratio.median_at(rule["since_step"])
    assert plotted == pytest.approx(reported, rel=0.1)
    assert plotted > 50  # far above the threshold: lora_B is not growing
    assert np.isinf(collapse.grad_ratio.column(1)).all()  # step 1: grad A = 0 (B = 0)


def test_cli_writes_the_report_with_a_replay_and_fails_on_a_missing_trace(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(
        ["report", str(runs.collapse), "--spec", str(runs.collapse_spec), "--out", str(out)]
    )
    printed = capsys.readouterr().out.strip()
    assert code == 0 and printed == str(out / REPORT_HTML)
    assert f"{c.RULE_LORA_GRADIENT_COLLAPSE} from step 60" in (out / REPORT_HTML).read_text()
    assert all((out / name).is_file() for name in FILES)

    assert main(["report", str(tmp_path / "nowhere")]) == 1
    assert str(tmp_path / "nowhere" / "trace.jsonl") in capsys.readouterr().err
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "trace.jsonl").write_text("not json\n")
    assert main(["report", str(garbage)]) == 1
    assert f"{garbage / 'trace.jsonl'}: no training records" in capsys.readouterr().err
