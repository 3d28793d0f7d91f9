"""The numbers behind each plot, pulled out of the trace records (pure numpy, no matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from lora_operator.health.records import EVAL_FIELDS, Record, as_float, is_finite

Array = npt.NDArray[np.float64]
MODULE_ORDER = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Heatmap:
    """values[row, column]: row = layer.module, column = telemetry step; NaN = no data."""

    quantity: str
    steps: tuple[int, ...]
    rows: tuple[str, ...]
    values: Array

    def column(self, step: int) -> Array:
        return self.values[:, self.steps.index(step)]

    def median_at(self, step: int) -> float:
        """Median over the modules at a step (inf counts as large), as the rules take it."""
        column = self.column(step)
        return float(np.median(column[~np.isnan(column)]))


@dataclass(frozen=True)
class Series:
    steps: tuple[int, ...]
    values: tuple[float, ...]


def _row_key(layer: int, module: str) -> tuple[int, int, str]:
    order = MODULE_ORDER.index(module) if module in MODULE_ORDER else len(MODULE_ORDER)
    return layer, order, module


def _row_label(layer: int, module: str) -> str:
    return f"{layer}.{module}" if layer >= 0 else module


def _heatmap(quantity: str, cells: Mapping[tuple[int, int, str], Mapping[int, float]]) -> Heatmap:
    keys = sorted(cells)
    steps = sorted({s for row in cells.values() for s in row})
    values = np.full((len(keys), len(steps)), np.nan)
    for i, key in enumerate(keys):
        for j, step in enumerate(steps):
            values[i, j] = cells[key].get(step, math.nan)
    return Heatmap(quantity, tuple(steps), tuple(_row_label(k[0], k[2]) for k in keys), values)


def grad_ratio_heatmap(records: Sequence[Record]) -> Heatmap:
    """||grad B|| / ||grad A|| per module and telemetry step; inf where grad A is exactly 0."""
    cells: dict[tuple[int, int, str], dict[int, float]] = {}
    for record in records:
        a = {(m.layer, m.module): m.grad_norm for m in record.of("A") if is_finite(m.grad_norm)}
        for m in record.of("B"):
            ga = a.get((m.layer, m.module))
            if ga is None or m.grad_norm is None or not math.isfinite(m.grad_norm):
                continue
            ratio = m.grad_norm / ga if ga > 0 else math.inf
            cells.setdefault(_row_key(m.layer, m.module), {})[record.step] = ratio
    return _heatmap("grad_ratio", cells)


def dw_rel_heatmap(records: Sequence[Record]) -> Heatmap:
    """dW_rel = ||scale * B @ A|| / ||W|| per module and telemetry step."""
    cells: dict[tuple[int, int, str], dict[int, float]] = {}
    for record in records:
        for m in record.modules:
            if m.dw_rel is not None:
                cells.setdefault(_row_key(m.layer, m.module), {})[record.step] = m.dw_rel
    return _heatmap("dw_rel", cells)


@dataclass(frozen=True)
class Band:
    """Median, min and max across modules per step (finite, positive values only)."""

    steps: tuple[int, ...]
    median: Array
    low: Array
    high: Array
    dropped: int  # non-finite or non-positive values left out (e.g. B leaving 0 at step 1)


def update_ratio_band(raw: Sequence[Mapping[str, Any]], matrix: str) -> Band:
    """update_ratio = ||p_after - p_before|| / ||p_before|| of lora_A or lora_B across modules."""
    steps: list[int] = []
    med: list[float] = []
    low: list[float] = []
    high: list[float] = []
    dropped = 0
    for value in raw:
        items = value.get("lora")
        if not isinstance(items, list):
            continue
        ratios = [
            as_float(item.get("update_ratio"))
            for item in items
            if isinstance(item, Mapping) and str(item.get("matrix", "")).upper() == matrix
        ]
        good = [r for r in ratios if r is not None and math.isfinite(r) and r > 0]
        dropped += len(ratios) - len(good)
        if good:
            steps.append(int(value["step"]))
            med.append(float(np.median(good)))
            low.append(min(good))
            high.append(max(good))
    return Band(tuple(steps), np.array(med), np.array(low), np.array(high), dropped)


def training_loss(records: Sequence[Record]) -> Series:
    points = {r.step: r.loss for r in records if r.loss is not None and math.isfinite(r.loss)}
    return Series(tuple(points), tuple(points.values()))


def eval_metric(records: Sequence[Record], name: str) -> Series:
    """One eval metric over steps (the last record of a step wins, e.g. after a resume)."""
    assert name in EVAL_FIELDS
    points: dict[int, float] = {}
    for r in records:
        value = r.eval.get(name)
        if value is not None and math.isfinite(value):
            points[r.step] = value
    return Series(tuple(points), tuple(points.values()))
