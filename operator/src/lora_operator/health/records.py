"""trace.jsonl records, normalised: any schema version, missing fields, NaN/Infinity strings.

The trainer writes non-finite numbers as the strings "NaN", "Infinity" and "-Infinity"
(docs/trace-schema.md); they become floats here. A record without `schema` is read as
version 0: the same field names, or the Hugging Face Trainer's log-history names
(`learning_rate`, `global_step`), with any field possibly missing. Unknown fields are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KNOWN_SCHEMA = 1
EVAL_FIELDS = ("eval_loss", "eval_bleu", "eval_rougeL")
_NONFINITE = {"nan": math.nan, "infinity": math.inf, "inf": math.inf, "-infinity": -math.inf}
_NONFINITE["-inf"] = -math.inf


class RecordError(ValueError):
    """A record that cannot be read at all (not an object, no step)."""


def as_float(value: Any) -> float | None:
    """A number, or a NaN/Infinity string, as float; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return _NONFINITE.get(value.strip().lower())
    return None


def as_int(value: Any) -> int | None:
    number = as_float(value)
    if number is None or not math.isfinite(number):
        return None
    return int(number)


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


@dataclass(frozen=True)
class MatrixStat:
    """One lora_A or lora_B matrix of one adapted module at one step."""

    layer: int
    module: str
    matrix: str
    grad_norm: float | None
    grad_zero_fraction: float | None
    grad_none: bool
    param_norm: float | None
    param_norm_init: float | None
    lr_sum: float | None

    @property
    def name(self) -> str:
        return f"layer {self.layer} {self.module}"


@dataclass(frozen=True)
class ModuleStat:
    """One adapted module: the relative size of its weight update."""

    layer: int
    module: str
    dw_rel: float | None

    @property
    def name(self) -> str:
        return f"layer {self.layer} {self.module}"


@dataclass(frozen=True)
class Record:
    """One trace record; absent fields are None (or empty)."""

    step: int
    schema: int = 0
    line: int | None = None
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    eval: Mapping[str, float] = field(default_factory=dict)
    matrices: tuple[MatrixStat, ...] = ()
    modules: tuple[ModuleStat, ...] = ()
    grad_none: int | None = None
    nonfinite: Mapping[str, int] = field(default_factory=dict)
    lr_groups: tuple[float, ...] = ()
    lr_sum_groups: tuple[float, ...] = ()

    @property
    def is_training(self) -> bool:
        return self.loss is not None or self.grad_norm is not None or bool(self.matrices)

    @property
    def is_eval(self) -> bool:
        return bool(self.eval)

    @property
    def has_telemetry(self) -> bool:
        return bool(self.matrices)

    def of(self, matrix: str) -> list[MatrixStat]:
        return [m for m in self.matrices if m.matrix == matrix]


def parse_record(raw: Any, line: int | None = None) -> Record:
    """Normalise one decoded JSON value; raises RecordError when it has no usable step."""
    if not isinstance(raw, Mapping):
        raise RecordError(f"expected a JSON object, got {type(raw).__name__}")
    step = as_int(raw.get("step", raw.get("global_step")))
    if step is None or step < 0:
        raise RecordError("no integer 'step' field")
    lr = as_float(raw.get("lr", raw.get("learning_rate")))
    evals = {k: v for k in EVAL_FIELDS if (v := as_float(raw.get(k))) is not None}
    nonfinite = {
        k: n
        for k in ("nonfinite_grad", "nonfinite_param", "nonfinite_exp_avg_sq")
        if (n := as_int(raw.get(k))) is not None
    }
    return Record(
        step=step,
        schema=as_int(raw.get("schema")) or 0,
        line=line,
        loss=as_float(raw.get("loss")),
        grad_norm=as_float(raw.get("grad_norm", raw.get("lora_grad_norm"))),
        lr=lr,
        eval=evals,
        matrices=tuple(_matrices(raw.get("lora"))),
        modules=tuple(_modules(raw.get("lora_modules"))),
        grad_none=as_int(raw.get("grad_none")),
        nonfinite=nonfinite,
        lr_groups=_floats(raw.get("lr_groups")),
        lr_sum_groups=_floats(raw.get("lr_sum_groups")),
    )


def _floats(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list):
        return ()
    numbers = [as_float(v) for v in value]
    return tuple(n for n in numbers if n is not None)


def _matrices(value: Any) -> list[MatrixStat]:
    if not isinstance(value, list):
        return []
    out = []
    for item in value:
        if not isinstance(item, Mapping) or str(item.get("matrix", "")).upper() not in ("A", "B"):
            continue
        grad = as_float(item.get("grad_norm"))
        none_flag = as_int(item.get("grad_none"))
        out.append(
            MatrixStat(
                layer=_layer(item.get("layer")),
                module=str(item.get("module", "?")),
                matrix=str(item["matrix"]).upper(),
                grad_norm=grad,
                grad_zero_fraction=as_float(item.get("grad_zero_fraction")),
                grad_none=bool(none_flag) if none_flag is not None else grad is None,
                param_norm=as_float(item.get("param_norm")),
                param_norm_init=as_float(item.get("param_norm_init")),
                lr_sum=as_float(item.get("lr_sum")),
            )
        )
    return out


def _modules(value: Any) -> list[ModuleStat]:
    if not isinstance(value, list):
        return []
    return [
        ModuleStat(
            layer=_layer(item.get("layer")),
            module=str(item.get("module", "?")),
            dw_rel=as_float(item.get("dw_rel")),
        )
        for item in value
        if isinstance(item, Mapping)
    ]


def _layer(value: Any) -> int:
    layer = as_int(value)
    return -1 if layer is None else layer
