"""Synthetic trace records in the shape of docs/trace-schema.md (schema 1)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

MODULES = ("q", "k", "v", "o")
LAYERS = (0, 1)
N_MODULES = len(MODULES) * len(LAYERS)

Value = float | str | None | Sequence[float | str | None]


def _at(value: Value, i: int) -> Any:
    return value[i] if isinstance(value, list | tuple) else value


def telemetry(
    step: int,
    *,
    lr: float = 1e-3,
    lr_sum: float | None = None,
    loss: float | str = 2.0,
    grad_a: Value = 0.01,
    grad_b: Value = 0.05,
    dw: Value = 0.3,
    a_norm: Value = 2.4,
    a_init: float = 2.0,
    zero_fraction: Value = 0.0,
    zero_fraction_a: Value | None = None,
    nonfinite_param: int = 0,
) -> dict[str, Any]:
    """A telemetry record: 8 modules (2 layers x q,k,v,o); a list gives per-module values."""
    lr_sum = lr * step if lr_sum is None else lr_sum
    lora, modules = [], []
    zf = {"A": zero_fraction if zero_fraction_a is None else zero_fraction_a, "B": zero_fraction}
    for i, (layer, module) in enumerate((la, m) for la in LAYERS for m in MODULES):
        for matrix, grad in (("A", _at(grad_a, i)), ("B", _at(grad_b, i))):
            lora.append(
                {
                    "layer": layer,
                    "module": module,
                    "matrix": matrix,
                    "grad_norm": grad,
                    "grad_zero_fraction": None if grad is None else _at(zf[matrix], i),
                    "grad_none": int(grad is None),
                    "param_norm": _at(a_norm, i) if matrix == "A" else 0.1,
                    "param_norm_init": a_init if matrix == "A" else 0.0,
                    "param_norm_ratio": 1.0,
                    "update_ratio": 0.01,
                    "exp_avg_norm": 0.01,
                    "exp_avg_sq_mean": 1e-8,
                    "lr_sum": lr_sum,
                }
            )
        modules.append({"layer": layer, "module": module, "dw_rel": _at(dw, i)})
    none = sum(entry["grad_none"] for entry in lora)
    return {
        **training(step, loss=loss, lr=lr),
        "lr_groups": [lr],
        "lr_sum_groups": [lr_sum],
        "lora_grad_norm": 1.0,
        "grad_none": none,
        "nonfinite_grad": 0,
        "nonfinite_param": nonfinite_param,
        "nonfinite_exp_avg_sq": 0,
        "lora": lora,
        "lora_modules": modules,
    }


def training(
    step: int, *, loss: float | str = 2.0, grad_norm: float | str = 1.0, lr: float = 1e-3
) -> dict[str, Any]:
    return {
        "schema": 1,
        "step": step,
        "epoch": step / 100,
        "lr": lr,
        "loss": loss,
        "grad_norm": grad_norm,
        "tokens": 1000 * step,
        "step_time": 0.1,
    }


def evaluation(step: int, loss: float, bleu: float | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"schema": 1, "step": step, "epoch": step / 100, "eval_loss": loss}
    if bleu is not None:
        record["eval_bleu"] = bleu
    return record


def trace(
    steps: int,
    *,
    interval: int = 5,
    lr: float = 1e-3,
    telemetry_at: Callable[[int], dict[str, Any]] | None = None,
    loss_at: Callable[[int], float | str] = lambda step: 2.0,
) -> list[dict[str, Any]]:
    """Steps 1..steps; telemetry at step 1 and every `interval` steps (like the trainer)."""
    records = []
    for step in range(1, steps + 1):
        if step == 1 or step % interval == 0:
            tel = telemetry_at(step) if telemetry_at else telemetry(step, lr=lr)
            tel["loss"] = loss_at(step)
            records.append(tel)
        else:
            records.append(training(step, lr=lr, loss=loss_at(step)))
    return records
