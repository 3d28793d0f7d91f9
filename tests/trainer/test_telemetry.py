"""Trainer telemetry: LoRA/Adam statistics equal a naive per-parameter computation.

One in-process single-process run (with a collector that also computes every number the
naive way, on the same step), one single-process reference and two 2-rank DeepSpeed runs
(ZeRO-2, ZeRO-3) on the same global batch.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lora_operator.local.ports import free_port
from lora_trainer.telemetry.collect import TelemetryCollector, _unwrap_optimizer
from lora_trainer.telemetry.stats import (
    Layout,
    MatrixKey,
    Segments,
    delta_w_sq,
    delta_w_sq_grouped,
    dw_rel,
    dw_rel_materialised,
    grad_sums,
    pack,
    param_sums,
    parse_module_name,
    shape_groups,
    unpack,
)
from tests.conftest import EXAMPLES, deep_merge

_NAME = re.compile(r"layers\.(\d+)\..*\.(\w+)_proj\.lora_([AB])\.")
_REL = 1e-4


def _num(value: Any) -> float:
    return float(value)  # trace.jsonl writes non-finite numbers as "NaN"/"Infinity"


def _close(a: Any, b: Any, rel: float = _REL, abs_tol: float = 1e-9) -> bool:
    if a is None or b is None:
        return a is b
    x, y = _num(a), _num(b)
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return math.isclose(x, y, rel_tol=rel, abs_tol=abs_tol)


# -- pure statistics -----------------------------------------------------------------------


@pytest.mark.parametrize(("out_f", "in_f", "r"), [(7, 5, 3), (32, 48, 8), (4, 4, 16)])
def test_dw_rel_factorised_equals_materialised(out_f: int, in_f: int, r: int) -> None:
    gen = torch.Generator().manual_seed(out_f * in_f + r)
    a = torch.randn(r, in_f, generator=gen, dtype=torch.float64)
    b = torch.randn(out_f, r, generator=gen, dtype=torch.float64)
    w = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    fact = dw_rel(a, b, torch.linalg.matrix_norm(w), 2.0)
    full = dw_rel_materialised(a, b, w, 2.0)
    assert fact.item() == pytest.approx(full.item(), rel=1e-5)
    assert delta_w_sq(a, torch.zeros_like(b)).item() == 0.0


def test_grad_sums_handles_none_exact_zeros_and_nonfinite() -> None:
    seg = Segments([4, 2, 3], torch.device("cpu"))
    g1 = torch.tensor([[0.0, 3.0], [4.0, 0.0]])
    rows, scalars = grad_sums(seg, [g1, None, torch.zeros(3)], [torch.tensor([math.nan, 1.0])])
    assert rows[0].sqrt().tolist() == pytest.approx([5.0, 0.0, 0.0])
    assert rows[1].tolist() == [2.0, 2.0, 3.0]  # exact-zero counts (None: reported as None)
    assert scalars.tolist()[0] == 1.0  # the NaN in another trainable parameter
    assert math.isnan(scalars.tolist()[1])  # its squared norm


def _naive(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [a.norm().item(), b.norm().item()]


def test_rank_fragments_sum_to_the_full_statistics() -> None:
    """ZeRO-1/2: each rank reduces the slices it owns; one all_reduce (here: a sum of the
    packed vectors) gives exactly the statistics of the full tensors."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 6), (5, 4), (4, 6), (3, 4)]  # A, B of two modules with different shapes
    full = {
        name: [torch.randn(*s, generator=gen) for s in shapes]
        for name in ("grad", "before", "after", "m", "v")
    }
    full["grad"][0][0, :3] = 0.0  # some exact zeros
    full["v"] = [v.abs() for v in full["v"]]
    numels = [math.prod(s) for s in shapes]
    flat = {k: torch.cat([t.reshape(-1) for t in ts]) for k, ts in full.items()}
    cut = sum(numels) // 2 + 1  # the flat partition boundary falls inside matrix 1
    packed = torch.zeros(0)
    for lo, hi in ((0, cut), (cut, sum(numels))):  # rank 0, rank 1
        spans: list[tuple[int, int]] = []
        frags: dict[str, list[torch.Tensor | None]] = {k: [] for k in full}
        start = 0
        for n in numels:
            s_lo, s_hi = max(lo, start), min(hi, start + n)
            spans.append((s_lo - start, s_hi - s_lo) if s_hi > s_lo else (0, 0))
            for k in full:
                frags[k].append(flat[k][s_lo:s_hi] if s_hi > s_lo else None)
            start += n
        seg = Segments(numels, torch.device("cpu"), spans)
        g_rows, g_sc = grad_sums(seg, frags["grad"])
        p_rows, p_sc = param_sums(
            seg, seg.flat(frags["before"]), frags["after"], frags["m"], frags["v"]
        )
        part = pack(g_rows, g_sc, p_rows, p_sc)
        packed = part if not len(packed) else packed + part
    keys = [
        MatrixKey(0, "q", "A"),
        MatrixKey(0, "q", "B"),
        MatrixKey(0, "k", "A"),
        MatrixKey(0, "k", "B"),
    ]
    pairs = [(0, 1, 2.0), (2, 3, 0.5)]
    groups = shape_groups([(shapes[a], shapes[b]) for a, b, _ in pairs])
    assert groups == [[0], [1]]
    dw = delta_w_sq_grouped(full["after"][0::2], full["after"][1::2], groups)
    layout = Layout(keys, numels, pairs, [0, 1], w_norms=[3.0, 4.0])
    stats = unpack(
        [*packed.tolist(), *dw.tolist()],
        layout,
        7,
        [False] * 4,
        [True] * 4,
        None,
        [1e-3],
        [2e-3],
        [0] * 4,
    )
    for i, m in enumerate(stats.matrices):
        grad, before, after = full["grad"][i], full["before"][i], full["after"][i]
        assert m.grad_norm == pytest.approx(grad.norm().item(), rel=1e-6)
        assert m.grad_zero_fraction == pytest.approx((grad == 0).float().mean().item())
        assert m.param_norm_init == pytest.approx(before.norm().item(), rel=1e-6)
        assert m.param_norm == pytest.approx(after.norm().item(), rel=1e-6)
        ratio = ((after - before).norm() / before.norm()).item()
        assert m.update_ratio == pytest.approx(ratio, rel=1e-5)
        assert m.exp_avg_norm == pytest.approx(full["m"][i].norm().item(), rel=1e-6)
        assert m.exp_avg_sq_mean == pytest.approx(full["v"][i].mean().item(), rel=1e-6)
        assert m.lr_sum == 2e-3
    for j, (a, b, scale) in enumerate(pairs):
        ref = dw_rel_materialised(
            full["after"][a], full["after"][b], torch.eye(1) * layout.w_norms[j], scale
        )
        assert stats.modules[j].dw_rel == pytest.approx(ref.item(), rel=1e-5)
    total = math.sqrt(sum(g.norm().item() ** 2 for g in full["grad"]))
    assert stats.lora_grad_norm == pytest.approx(total, rel=1e-6)
    assert stats.nonfinite_grad == stats.nonfinite_param == stats.nonfinite_exp_avg_sq == 0


def test_module_names() -> None:
    name = "base_model.model.model.layers.11.self_attn.q_proj"
    assert parse_module_name(name) == (11, "q")
    assert parse_module_name("base_model.model.model.layers.0.mlp.down_proj") == (0, "down")


# -- plain single process vs naive per-parameter ------------------------------------------


class NaiveCollector(TelemetryCollector):
    """Also computes every statistic naively (named_parameters, p.grad.norm(), ...)."""

    instances: list[NaiveCollector] = []

    def __init__(self, interval_steps: int = 10) -> None:
        super().__init__(interval_steps)
        self.naive: dict[int, dict[tuple[int, str, str], dict[str, float]]] = {}
        self.naive_dw: dict[int, dict[tuple[int, str], float]] = {}
        self.init: dict[str, float] = {}
        self._prev: dict[str, torch.Tensor] = {}
        NaiveCollector.instances.append(self)

    def _install(self) -> None:
        was = self._installed
        super()._install()
        if was or not self._installed:
            return
        trainer = self.trainer
        model = trainer.model
        named = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
        optimizer = _unwrap_optimizer(trainer.optimizer)
        clip = trainer._clip_grad_norm

        def key(name: str) -> tuple[int, str, str]:
            m = _NAME.search(name)
            assert m, name
            return int(m.group(1)), m.group(2), m.group(3)

        def naive_clip(*args: Any, **kwargs: Any) -> Any:
            step = self._step_after()
            if self.due(step):
                self.naive[step] = {
                    key(n): {
                        "grad_norm": p.grad.norm().item(),
                        "grad_zero_fraction": (p.grad == 0).float().mean().item(),
                    }
                    for n, p in named
                    if p.grad is not None
                }
            return clip(*args, **kwargs)

        def pre(opt: Any, *args: Any) -> None:
            if not self.init:
                self.init = {n: p.detach().norm().item() for n, p in named}
            self._prev = {n: p.detach().clone() for n, p in named}

        def post(opt: Any, *args: Any) -> None:
            step = self._step_after()
            if step not in self.naive:
                return
            for n, p in named:
                rec = self.naive[step][key(n)]
                st = opt.state[p]
                rec["param_norm"] = p.detach().norm().item()
                rec["param_norm_init"] = self.init[n]
                rec["update_ratio"] = (
                    (p.detach() - self._prev[n]).norm() / self._prev[n].norm()
                ).item()
                rec["exp_avg_norm"] = st["exp_avg"].norm().item()
                rec["exp_avg_sq_mean"] = st["exp_avg_sq"].mean().item()
            from peft.tuners.lora import LoraLayer

            self.naive_dw[step] = {}
            for name, mod in model.named_modules():
                if isinstance(mod, LoraLayer):
                    layer, short = (
                        int(name.split("layers.")[1].split(".")[0]),
                        name.rsplit(".", 1)[1],
                    )
                    delta = mod.scaling["default"] * (
                        mod.lora_B["default"].weight @ mod.lora_A["default"].weight
                    )
                    w = mod.get_base_layer().weight
                    self.naive_dw[step][(layer, short.removesuffix("_proj"))] = (
                        delta.norm() / w.norm()
                    ).item()

        # registered after the collector's own: clip wrapper runs first, hooks run after
        trainer._clip_grad_norm = naive_clip
        optimizer.register_step_pre_hook(pre)
        optimizer.register_step_post_hook(post)


def _spec_body(tiny_dir: Path, patch: dict[str, Any]) -> dict[str, Any]:
    body = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    body = json.loads(json.dumps(body).replace("/tmp/lora-operator/tiny", str(tiny_dir)))
    base = {
        "training": {
            "maxSteps": 3,
            "warmup": {"steps": 0},
            "eval": {"everySteps": 100, "metrics": ["loss"]},
        },
        "monitoring": {"intervalSteps": 2},
    }
    return deep_merge(body, {"spec": deep_merge(base, patch)})


def _write(tmp: Path, body: dict[str, Any]) -> Path:
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _records(out: Path) -> dict[int, dict[str, Any]]:
    lines = (out / "trace.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "lora" in r}


@pytest.fixture(scope="module")
def plain_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_assets: Any
) -> tuple[dict[int, dict[str, Any]], NaiveCollector, dict[int, dict[str, Any]]]:
    from lora_trainer import train
    from lora_trainer.config import load_spec

    tmp = tmp_path_factory.mktemp("telemetry_plain")
    _, spec = load_spec(_write(tmp, _spec_body(Path(tiny_assets.model_dir).parent, {})))
    NaiveCollector.instances.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "TelemetryCollector", NaiveCollector)
        train.run(spec, tmp / "out")
    (collector,) = NaiveCollector.instances
    lines = (tmp / "out" / "trace.jsonl").read_text().splitlines()
    all_train = {r["step"]: r for r in map(json.loads, lines) if "loss" in r}
    return _records(tmp / "out"), collector, all_train


@pytest.mark.training
@pytest.mark.slow
def test_plain_run_equals_naive_per_parameter(plain_run: Any) -> None:
    records, collector, all_train = plain_run
    assert sorted(records) == [1, 2], "collected at step 1 and every intervalSteps (2)"
    assert all("lora" not in r for s, r in all_train.items() if s not in records)
    assert collector.mode == "torch"
    for step, record in records.items():
        naive = collector.naive[step]
        assert len(record["lora"]) == len(naive) == 16  # 2 layers x q,k,v,o x A,B
        for entry in record["lora"]:
            ref = naive[(entry["layer"], entry["module"], entry["matrix"])]
            for name, value in ref.items():
                assert _close(entry[name], value), (step, entry, name, value)
            assert entry["grad_none"] == 0
        dws = collector.naive_dw[step]
        assert len(record["lora_modules"]) == len(dws) == 8
        for mod in record["lora_modules"]:
            assert _close(mod["dw_rel"], dws[(mod["layer"], mod["module"])]), (step, mod)
        # pre-clip: the total equals HF's grad_norm (clipping at 1.0 is active here)
        assert record["grad_norm"] > 1.0
        assert _close(record["lora_grad_norm"], record["grad_norm"])
        assert record["nonfinite_grad"] == record["nonfinite_param"] == 0
        assert record["grad_none"] == 0


@pytest.mark.training
@pytest.mark.slow
def test_default_init_step_one_grad_a_zero_grad_b_positive(plain_run: Any) -> None:
    records, _, _ = plain_run
    first = records[1]["lora"]
    for entry in first:
        if entry["matrix"] == "A":
            assert entry["grad_norm"] == 0.0 and entry["grad_zero_fraction"] == 1.0
            assert entry["param_norm_init"] > 0
        else:
            assert entry["grad_norm"] > 0 and entry["param_norm_init"] == 0.0
            assert _num(entry["update_ratio"]) == math.inf  # B moved off 0
    assert all(m["dw_rel"] > 0 for m in records[1]["lora_modules"])
    assert all(e["grad_norm"] > 0 for e in records[2]["lora"]), "A gets a grad once B moved"
    lr = records[1]["lr"]
    assert records[2]["lr_sum_groups"][0] == pytest.approx(lr + records[2]["lr"])


# -- DeepSpeed ZeRO-2/3 over 2 gloo processes vs a single-process reference -----------------


def _dist_patch(distributed: dict[str, Any], micro: int) -> dict[str, Any]:
    return {
        "lora": {"dropout": 0.0},  # dropout masks depend on the rank layout
        "training": {"microBatchSize": micro},
        "monitoring": {"intervalSteps": 1},
        "distributed": {"device": "cpu", "gpusPerNode": 0, **distributed},
    }


def _cli(tmp: Path, body: dict[str, Any], nproc: int) -> Path:
    spec, out = _write(tmp, body), tmp / "out"
    tail = ["--spec", str(spec), "--output", str(out)]
    cmd = [sys.executable, "-m", "lora_trainer"]
    cmd += ["launch", "--nproc-per-node", str(nproc), "--", *tail] if nproc > 1 else tail
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (tmp / "cli.log").write_text(proc.stdout + proc.stderr)
    return out


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory: pytest.TempPathFactory, tiny_assets: Any) -> dict[str, Path]:
    tiny = Path(tiny_assets.model_dir).parent
    runs = {
        "reference": _cli(
            tmp_path_factory.mktemp("telemetry_ref"), _spec_body(tiny, _dist_patch({}, 16)), 1
        )
    }
    variants: dict[str, dict[str, Any]] = {
        f"zero{stage}": {"deepspeed": {"zeroStage": stage}} for stage in (1, 2, 3)
    }
    variants["ddp"] = {"launcher": "torchrun"}  # no DeepSpeed: torchrun + DDP
    for name, dist in variants.items():
        body = _spec_body(tiny, _dist_patch({"processesPerNode": 2, **dist}, 8))  # 2 x 8 = 16
        runs[name] = _cli(tmp_path_factory.mktemp(f"telemetry_{name}"), body, 2)
    return runs


@pytest.mark.training
@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "ddp"])
def test_two_ranks_equal_single_process(zero_runs: dict[str, Path], name: str) -> None:
    """ZeRO-1/2 (rank fragments + one all_reduce), ZeRO-3 (gathered) and torchrun DDP give
    the single-process numbers on the same global batch."""
    ref, got = _records(zero_runs["reference"]), _records(zero_runs[name])
    mode = {"zero1": "zero-fragments", "zero2": "zero-fragments", "zero3": "zero-gathered"}
    log = (zero_runs[name].parent / "cli.log").read_text()
    assert f"({mode.get(name, 'torch')})" in log, log[-2000:]
    assert sorted(got) == sorted(ref) == [1, 2, 3]
    for step in ref:
        r, g = ref[step], got[step]
        assert _close(g["lora_grad_norm"], r["lora_grad_norm"])
        assert g["lr_sum_groups"][0] == pytest.approx(r["lr_sum_groups"][0])
        assert len(g["lora"]) == len(r["lora"]) == 16
        for e_ref, e_got in zip(r["lora"], g["lora"], strict=True):
            assert (e_ref["layer"], e_ref["module"], e_ref["matrix"]) == (
                e_got["layer"],
                e_got["module"],
                e_got["matrix"],
            )
            for field in (
                "grad_norm",
                "grad_zero_fraction",
                "param_norm",
                "param_norm_init",
                "update_ratio",
                "exp_avg_norm",
                "exp_avg_sq_mean",
            ):
                # fp32 sums in another order (measured worst: 1.4e-6 relative)
                assert _close(e_got[field], e_ref[field], abs_tol=1e-12), (
                    name,
                    step,
                    e_ref,
                    field,
                    e_got[field],
                )
        for m_ref, m_got in zip(r["lora_modules"], g["lora_modules"], strict=True):
            assert _close(m_got["dw_rel"], m_ref["dw_rel"]), (name, step, m_ref)
        if step == 1:
            assert all(e["grad_norm"] == 0.0 for e in g["lora"] if e["matrix"] == "A")
            assert all(e["grad_norm"] > 0 for e in g["lora"] if e["matrix"] == "B")


# -- Prometheus exporter ---------------------------------------------------------------------


def _families(text: str) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def _check_metrics(fams: dict[str, Any], per_module: bool = True) -> None:
    assert all(name.startswith("lora_trainer_") for name in fams), sorted(fams)
    assert fams["lora_trainer_steps"].type == "counter"  # exposed as ..._steps_total
    assert fams["lora_trainer_steps"].samples[0].name == "lora_trainer_steps_total"
    assert fams["lora_trainer_steps"].samples[0].value >= 1
    assert fams["lora_trainer_telemetry_step"].samples[0].value >= 1
    medians = fams["lora_trainer_lora_grad_norm_median"].samples
    median = {s.labels["matrix"]: s.value for s in medians}
    assert set(median) == {"A", "B"} and median["B"] > 0
    if not per_module:
        assert "lora_trainer_lora_grad_norm" not in fams
        return
    samples = fams["lora_trainer_lora_grad_norm"].samples
    assert len(samples) == 16
    assert {tuple(sorted(s.labels)) for s in samples} == {("layer", "matrix", "module")}
    assert {s.labels["module"] for s in samples} == {"q", "k", "v", "o"}
    assert {s.labels["layer"] for s in samples} == {"0", "1"}
    assert len(fams["lora_trainer_lora_delta_weight_ratio"].samples) == 8


@pytest.mark.training
@pytest.mark.slow
@pytest.mark.parametrize("per_module", [True, False])
def test_lora_collector_families(plain_run: Any, per_module: bool) -> None:
    from prometheus_client import generate_latest

    from lora_trainer.telemetry.exporter import build_registry

    _, collector, _ = plain_run
    text = generate_latest(build_registry(collector, per_module)).decode()
    _check_metrics(_families(text), per_module)


@pytest.mark.training
@pytest.mark.slow
def test_metrics_endpoint_during_a_real_run(tmp_path: Path, tiny_assets: Any) -> None:
    import time
    import urllib.request

    port = free_port()
    patch = {
        "training": {"maxSteps": 100},
        "monitoring": {"intervalSteps": 5, "port": port},
    }
    spec = _write(tmp_path, _spec_body(Path(tiny_assets.model_dir).parent, patch))
    cmd = [sys.executable, "-m", "lora_trainer", "--spec", str(spec), "--output"]
    proc = subprocess.Popen(
        [*cmd, str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline, text = time.monotonic() + 120, ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                text = ""
            if "lora_trainer_lora_grad_norm{" in text:
                break
            time.sleep(0.2)
        assert "lora_trainer_lora_grad_norm{" in text, "no LoRA metrics while training ran"
        fams = _families(text)
        _check_metrics(fams)
        # every documented family (CUDA-only ones aside; a healthy run has no last firing step)
        from lora_trainer.telemetry.catalog import CATALOG

        documented = {
            m.family
            for m in CATALOG
            if m.when != "cuda" and m.name != "lora_trainer_health_rule_last_firing_step"
        }
        assert documented <= set(fams), sorted(documented - set(fams))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # checkpoints and stops at the step boundary
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode in (0, 128 + signal.SIGTERM), out[-4000:]
