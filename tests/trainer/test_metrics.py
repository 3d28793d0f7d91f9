"""Trainer metrics: the catalog is the single source of the exporter's families and of
docs/metrics.md; per-rank counters sum over real processes in multiprocess mode; a real run
exports its run info, data statistics and per-rank counters.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from lora_operator.local.ports import free_port
from lora_trainer.data_stats import DataStats
from lora_trainer.telemetry import catalog
from lora_trainer.telemetry.catalog import BY_NAME, CATALOG, RUN_INFO_LABELS, MetricDef
from lora_trainer.telemetry.collect import TelemetryCollector
from lora_trainer.telemetry.counters import ENV_PROM_DIR, RankMetrics
from lora_trainer.telemetry.exporter import build_registry, run_info_labels, start_exporter
from lora_trainer.telemetry.stats import MatrixStats, ModuleStats, StepStats
from tests.conftest import EXAMPLES, ROOT, deep_merge

DOCS = ROOT / "docs" / "metrics.md"
LAYERS, MODULES = 3, ("q", "v")
FAMILY = {m.family: m for m in CATALOG}
# bounded: indices, projection names, A/B, and the api constants' verdicts/rules/severities
BOUNDED_LABELS = {"layer", "module", "matrix", "group", "tensor", "verdict", "rule", "severity"}
GAUGE_MODES = {"max", "min", "livemax", "livemin", "mostrecent", "livemostrecent", "liveall"}


# -- fixtures: synthetic statistics (no training) ------------------------------------------


def _stats() -> StepStats:
    matrices, modules = [], []
    for layer in range(LAYERS):
        for i, module in enumerate(MODULES):
            for matrix in ("A", "B"):
                none = layer == 2 and module == "v" and matrix == "A"  # one grad is None
                grad = None if none else 0.1 * (layer + 1) + i + (matrix == "B")
                matrices.append(
                    MatrixStats(
                        layer=layer,
                        module=module,
                        matrix=matrix,
                        grad_norm=grad,
                        grad_zero_fraction=None if none else 0.0,
                        grad_none=int(none),
                        param_norm=1.0 + layer + i,
                        param_norm_init=1.0,
                        param_norm_ratio=1.0 + layer + i,
                        update_ratio=1e-3,
                        exp_avg_norm=None if none else 0.5,
                        exp_avg_sq_mean=None if none else 1e-6,
                        lr_sum=0.03,
                    )
                )
            modules.append(ModuleStats(layer=layer, module=module, dw_rel=0.01 * (layer + 1)))
    return StepStats(
        step=5,
        lr=[1e-3, 4e-3],
        lr_sum=[0.03, 0.12],
        lora_grad_norm=2.5,
        grad_none=1,
        nonfinite_grad=0,
        nonfinite_param=0,
        nonfinite_exp_avg_sq=0,
        matrices=matrices,
        modules=modules,
        loss=1.25,
    )


def _telemetry(stats: StepStats | None) -> TelemetryCollector:
    telemetry = TelemetryCollector(5)
    telemetry.latest = stats
    telemetry.latest_time = 1.7e9 if stats is not None else 0.0
    telemetry.trainer = SimpleNamespace(state=SimpleNamespace(global_step=7))
    return telemetry


DATA = DataStats(
    samples=100,
    malformed=2,
    tokens=12800,
    supervised_tokens=6400,
    supervised_fraction=0.5,
    samples_without_supervision=1,
    truncated_samples=5,
    truncation_rate=0.05,
    samples_with_dropped_turns=3,
    special_token_ratio=0.1,
    pad_label_fraction=0.0,
    eos_label_fraction=0.08,
    mean_length=128.0,
    max_length=256,
).to_dict()
RUN_INFO = {label: f"x-{label}" for label in RUN_INFO_LABELS}


def _scrape(registry: CollectorRegistry) -> dict[str, Any]:
    return _parse(generate_latest(registry).decode())


def _parse(text: str) -> dict[str, Any]:
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), "a family appears twice"
    return {f.name: f for f in families}


def _values(family: Any, *keys: str) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels[k] for k in keys): s.value for s in family.samples}


def _registry(per_module: bool, stats: StepStats | None = None) -> CollectorRegistry:
    rank = RankMetrics(cuda=False)
    rank.record_step(samples=8, tokens=8 * 64, seconds=0.5)
    return build_registry(
        _telemetry(stats),
        per_module,
        rank_metrics=rank,
        run_info=RUN_INFO,
        data=DATA,
    )


def _expected(per_module: bool, collected: bool = True, health: bool = False) -> set[str]:
    return {
        m.family
        for m in CATALOG
        if m.when != "cuda"
        and (health or m.when != "health")  # the rules run in real runs (test_health_live.py)
        and (per_module or not m.per_module)
        and (collected or m.when != "collected")
    }


def _check_family(fam: Any, m: MetricDef) -> None:
    assert fam.type == m.type, fam.name
    assert fam.documentation == m.help, fam.name
    for sample in fam.samples:
        extra = {"le"} if sample.name.endswith("_bucket") else set()
        assert set(sample.labels) == set(m.labels) | extra, (fam.name, sample)


# -- the catalog ----------------------------------------------------------------------------


def test_catalog_follows_the_naming_conventions() -> None:
    assert len(BY_NAME) == len(CATALOG) == len(FAMILY), "duplicate metric names"
    for m in CATALOG:
        assert m.name.startswith("lora_trainer_"), m.name
        assert m.name.endswith("_total") == (m.type == "counter"), m.name
        for unit in ("seconds", "bytes"):
            assert m.name.endswith(f"_{unit}") == (m.unit == unit), m.name
        assert m.family in m.promql and m.help.endswith("."), m.name
        if m.name.endswith("_info"):
            assert m.type == "gauge" and m.labels == RUN_INFO_LABELS
        else:
            assert set(m.labels) <= BOUNDED_LABELS, m.name
        if m.source == "rank":
            assert m.scope == "rank" and not m.per_module
            assert m.type != "gauge" or m.mode in GAUGE_MODES, m.name  # never "all" (pid label)
        else:
            assert not m.mode
    per_module = [m for m in CATALOG if m.per_module]
    assert per_module and all({"layer", "module"} <= set(m.labels) for m in per_module)


def test_docs_are_generated_from_the_catalog(tmp_path: Path) -> None:
    assert DOCS.read_text() == catalog.render(), (
        "docs/metrics.md drifted: python -m lora_trainer.telemetry.catalog --write docs/metrics.md"
    )
    for m in CATALOG:
        assert f"| `{m.name}` |" in DOCS.read_text()
    assert catalog.main(["--check", str(DOCS)]) == 0
    stale = tmp_path / "metrics.md"
    stale.write_text(DOCS.read_text().replace("lora_trainer_loss", "lora_trainer_lost"))
    assert catalog.main(["--check", str(stale)]) == 1
    assert catalog.main(["--write", str(stale)]) == 0 and stale.read_text() == DOCS.read_text()


# -- the exporter against the catalog --------------------------------------------------------


@pytest.mark.parametrize("per_module", [True, False])
def test_exporter_families_are_the_catalogs(
    per_module: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_PROM_DIR, raising=False)
    fams = _scrape(_registry(per_module, _stats()))
    assert set(fams) == _expected(per_module)
    for name, fam in fams.items():
        _check_family(fam, FAMILY[name])
    n_matrices, n_modules = LAYERS * len(MODULES) * 2, LAYERS * len(MODULES)
    for m in CATALOG:
        if m.per_module and per_module:
            want = n_matrices if "matrix" in m.labels else n_modules
            assert len(fams[m.family].samples) == want, m.name
    # aggregates remain without per-module detail
    medians = _values(fams["lora_trainer_lora_grad_norm_median"], "matrix")
    assert set(medians) == {("A",), ("B",)}
    layer = _values(fams["lora_trainer_lora_layer_grad_norm"], "layer", "matrix")
    assert len(layer) == LAYERS * 2
    # layer 2, matrix A: q's grad (2.1) only, v's is None
    assert layer[("2", "A")] == pytest.approx(0.3)
    assert layer[("0", "B")] == pytest.approx(math.hypot(1.1, 2.1))
    nonfinite = _values(fams["lora_trainer_nonfinite_elements"], "tensor")
    assert set(nonfinite) == {("grad",), ("param",), ("exp_avg_sq",)}
    assert _values(fams["lora_trainer_learning_rate"], "group") == {("0",): 1e-3, ("1",): 4e-3}
    assert fams["lora_trainer_steps"].samples[0].value == 7
    assert fams["lora_trainer_loss"].samples[0].value == 1.25
    assert fams["lora_trainer_data_truncated_ratio"].samples[0].value == 0.05
    assert fams["lora_trainer_data_max_length_tokens"].samples[0].value == 256
    if per_module:
        none = _values(fams["lora_trainer_lora_grad_norm"], "layer", "module", "matrix")
        assert math.isnan(none[("2", "v", "A")])


def test_before_the_first_collection_only_progress_run_data_and_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV_PROM_DIR, raising=False)
    fams = _scrape(_registry(True, None))
    assert set(fams) == _expected(True, collected=False)
    assert fams["lora_trainer_samples"].samples[0].value == 8
    assert fams["lora_trainer_tokens"].samples[0].value == 8 * 64


def test_run_info_labels(tmp_path: Path, quickstart_body: dict[str, Any]) -> None:
    import torch

    from lora_trainer.config import load_spec

    body = deep_merge(quickstart_body, {"spec": {"distributed": {"deepspeed": {"zeroStage": 3}}}})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(body))
    _, spec = load_spec(path)
    labels = run_info_labels(spec, "abc123", world_size=4)
    assert tuple(labels) == RUN_INFO_LABELS
    assert labels["model"] == "model"  # the last path component: no host path on /metrics
    from lora_trainer.telemetry.exporter import model_label

    assert model_label("hf://meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert model_label("pvc://models/llama/7b/") == "7b"
    assert (labels["r"], labels["alpha"], labels["zero_stage"]) == ("16", "32", "3")
    assert labels["target_modules"] == "k_proj,o_proj,q_proj,v_proj"
    assert (labels["world_size"], labels["spec_hash"], labels["device"]) == ("4", "abc123", "cpu")
    assert labels["torch_version"] == torch.__version__ and labels["trainer_version"]
    registry = build_registry(_telemetry(None), run_info=labels)
    (sample,) = _scrape(registry)["lora_trainer_run_info"].samples
    assert sample.value == 1 and sample.labels == labels


# -- multiprocess mode: two real rank processes, one served registry ------------------------

RANK_SCRIPT = textwrap.dedent(
    """
    import sys
    from lora_trainer.telemetry.counters import RankMetrics

    metrics = RankMetrics(cuda=False)
    steps, rows = int(sys.argv[1]), int(sys.argv[2])
    for i in range(steps):
        metrics.record_step(samples=rows, tokens=rows * 32, seconds=0.2 * (i + 1))
    """
)


def test_launcher_gives_the_ranks_a_fresh_multiprocess_dir(tmp_path: Path) -> None:
    from lora_trainer.launch import prepare_env

    prom = tmp_path / "prom"
    (prom / "old").mkdir(parents=True)
    (prom / "counter_123.db").write_text("stale")
    env = prepare_env({ENV_PROM_DIR: str(prom)}, tmp_path / "status")
    assert env[ENV_PROM_DIR] == str(prom) and list(prom.iterdir()) == []
    env = prepare_env({}, tmp_path / "status")  # no pod emptyDir: one under the status dir
    assert Path(env[ENV_PROM_DIR]).is_dir()


@pytest.mark.slow
def test_multiprocess_counters_sum_over_real_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prom = tmp_path / "prom"
    prom.mkdir()
    env = {**os.environ, ENV_PROM_DIR: str(prom), "PYTHONPATH": str(ROOT)}
    ranks = [
        subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(steps), str(rows)], env=env)
        for steps, rows in ((3, 4), (2, 8))
    ]
    assert [p.wait(timeout=120) for p in ranks] == [0, 0]

    monkeypatch.setenv(ENV_PROM_DIR, str(prom))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    port = free_port()
    monitoring = SimpleNamespace(port=port, per_module=False)
    exporter = start_exporter(monitoring, _telemetry(_stats()), run_info=RUN_INFO, data=DATA)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            fams = _parse(resp.read().decode())
    finally:
        exporter.close()
    assert set(fams) == _expected(per_module=False)  # multiprocess + LoRA collector, once each
    for name, fam in fams.items():
        _check_family(fam, FAMILY[name])  # in particular: no pid label on the gauge
    assert fams["lora_trainer_samples"].samples[0].value == 3 * 4 + 2 * 8
    assert fams["lora_trainer_tokens"].samples[0].value == (3 * 4 + 2 * 8) * 32
    hist = {s.name: s for s in fams["lora_trainer_step_duration_seconds"].samples if not s.labels}
    assert hist["lora_trainer_step_duration_seconds_count"].value == 5
    assert hist["lora_trainer_step_duration_seconds_sum"].value == pytest.approx(1.2 + 0.6)
    assert len(fams["lora_trainer_last_step_timestamp_seconds"].samples) == 1
    assert fams["lora_trainer_steps"].samples[0].value == 7  # job-wide: global rank 0 only


def test_other_ranks_serve_only_the_multiprocess_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_PROM_DIR, str(tmp_path / "prom"))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "2")  # local rank 0 of the second pod
    exporter = start_exporter(
        SimpleNamespace(port=free_port(), per_module=True), _telemetry(_stats()), data=DATA
    )
    try:
        assert exporter.registry is not None
        assert _scrape(exporter.registry) == {}  # no rank has written yet, no job families
    finally:
        exporter.close()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert start_exporter(SimpleNamespace(port=free_port(), per_module=True), None).server is None


# -- one real tiny run: the wiring in train.py ------------------------------------------------


@pytest.fixture(scope="module")
def real_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_assets: Any
) -> tuple[dict[str, Any], Path]:
    from lora_trainer import train
    from lora_trainer.config import load_spec

    tmp = tmp_path_factory.mktemp("metrics_run")
    body = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    body = json.loads(
        json.dumps(body).replace("/tmp/lora-operator/tiny", str(Path(tiny_assets.model_dir).parent))
    )
    patch = {
        "training": {
            "maxSteps": 2,
            "microBatchSize": 4,
            "warmup": {"steps": 0},
            "eval": {"everySteps": 100, "metrics": ["loss"], "maxSamples": 8},
        },
        "monitoring": {"intervalSteps": 1, "perModule": False, "port": free_port()},
    }
    (tmp / "spec.yaml").write_text(yaml.safe_dump(deep_merge(body, {"spec": patch})))
    _, spec = load_spec(tmp / "spec.yaml")
    served: list[Any] = []

    def capture(*args: Any, **kwargs: Any) -> Any:
        exporter = start_exporter(*args, **kwargs)
        served.append(exporter)
        return exporter

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(ENV_PROM_DIR, raising=False)
        mp.setattr(train, "start_exporter", capture)
        train.run(spec, tmp / "out")
    (exporter,) = served
    return _scrape(exporter.registry), tmp / "out"


@pytest.mark.training
@pytest.mark.slow
def test_a_real_run_exports_run_info_data_and_rank_counters(real_run: Any) -> None:
    fams, out = real_run
    summary = json.loads((out / "summary.json").read_text())
    data = json.loads((out / "data_stats.json").read_text())
    assert set(fams) == _expected(per_module=False, health=True)
    for name, fam in fams.items():
        _check_family(fam, FAMILY[name])
    (info,) = fams["lora_trainer_run_info"].samples
    assert info.labels["spec_hash"] == summary["spec_hash"]
    assert info.labels["world_size"] == "1" and info.labels["zero_stage"] == "none"
    for m in CATALOG:
        if m.scope == "data":
            assert fams[m.family].samples[0].value == pytest.approx(data[m.field]), m.name
    assert fams["lora_trainer_steps"].samples[0].value == summary["steps"] == 2
    # 2 steps x 4 rows: the base-model evaluation before training is not counted
    assert fams["lora_trainer_samples"].samples[0].value == 8
    assert fams["lora_trainer_tokens"].samples[0].value > 8
    hist = {s.name: s.value for s in fams["lora_trainer_step_duration_seconds"].samples}
    assert hist["lora_trainer_step_duration_seconds_count"] == 2
    assert hist["lora_trainer_step_duration_seconds_sum"] > 0
    layers = _values(fams["lora_trainer_lora_layer_grad_norm"], "layer", "matrix")
    assert set(layers) == {(str(layer), mat) for layer in (0, 1) for mat in ("A", "B")}
    assert layers[("0", "B")] > 0
