"""What one evaluation of the rules sees, and the evidence a rule returns."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lora_operator.health.config import HealthConfig
from lora_operator.health.records import Record
from lora_operator.health.stream import EvalPoint

WORST_SHOWN = 3


@dataclass(frozen=True)
class Finding:
    """A rule's condition holds: a one-line message, measured values, the worst modules."""

    message: str
    values: Mapping[str, Any] = field(default_factory=dict)
    worst: Sequence[Mapping[str, Any]] = ()

    def evidence(self, step: int) -> dict[str, Any]:
        """JSON-ready: non-finite numbers as "NaN"/"Infinity" strings, as in trace.jsonl."""
        return {
            "step": step,
            "values": {k: _json_number(v) for k, v in self.values.items()},
            "worst": [{k: _json_number(v) for k, v in w.items()} for w in self.worst],
        }


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


class NoData:
    """The rule has nothing new to judge at this evaluation: its state stays as it is."""

    def __repr__(self) -> str:
        return "NO_DATA"


NO_DATA = NoData()
Outcome = Finding | NoData | None


@dataclass(frozen=True)
class Window:
    """The stream as one evaluation sees it (built by the engine)."""

    step: int
    config: HealthConfig
    telemetry: Record | None = None
    grace_over: bool = False
    lr_sum_b: float = 0.0
    prior_lr_sum: float = 0.0
    a_init: Mapping[tuple[int, str], float] = field(default_factory=dict)
    nan_loss_steps: int = 0
    nonfinite_streak: int = 0  # longest run of non-finite steps since the last evaluation
    empty_streak: int = 0  # longest run of NaN-loss, zero-gradient steps since then
    lr_seen: bool = False
    lr_positive_seen: bool = False
    evals: Sequence[EvalPoint] = ()
    data_stats: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Aggregate:
    """One statistic over modules: median, fraction flagged, worst first."""

    median: float
    flagged: int
    total: int
    worst: list[dict[str, Any]]

    @property
    def fraction(self) -> float:
        return self.flagged / self.total if self.total else 0.0

    def values(self, name: str) -> dict[str, Any]:
        return {
            f"median_{name}": self.median,
            "modules_flagged": self.flagged,
            "modules": self.total,
            "fraction_flagged": round(self.fraction, 4),
        }


def aggregate(
    items: Sequence[tuple[str, float]],
    bad: Callable[[float], bool],
    worst_is_high: bool,
) -> Aggregate | None:
    """Median of the values, how many are bad, and the worst few (by value)."""
    if not items:
        return None
    flagged = [(n, v) for n, v in items if bad(v)]
    ordered = sorted(flagged, key=lambda nv: nv[1], reverse=worst_is_high)
    worst = [{"module": n, "value": v} for n, v in ordered[:WORST_SHOWN]]
    return Aggregate(statistics.median(v for _, v in items), len(flagged), len(items), worst)
