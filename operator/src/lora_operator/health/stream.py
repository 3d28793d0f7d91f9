"""Running statistics over accepted trace records (the engine's memory between evaluations)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from lora_operator.health.records import Record, is_finite

TRAIN_LOSS_SPAN = 10  # training losses averaged around an eval step


@dataclass
class EvalPoint:
    """An eval record with the training loss around it (mean of TRAIN_LOSS_SPAN losses)."""

    step: int
    metrics: Mapping[str, float]
    loss_before: float | None
    losses_after: list[float] = field(default_factory=list)

    @property
    def train_loss(self) -> float | None:
        if self.loss_before is not None:
            return self.loss_before
        return sum(self.losses_after) / len(self.losses_after) if self.losses_after else None


@dataclass
class StreamState:
    """Counters and histories the rules read; updated once per accepted record."""

    telemetry: Record | None = None  # newest telemetry since the previous evaluation
    a_init: dict[tuple[int, str], float] = field(default_factory=dict)
    lr_integrated: float = 0.0
    lr_seen: bool = False
    lr_positive_seen: bool = False
    nan_loss_steps: int = 0
    nonfinite_streak: int = 0  # consecutive steps with a non-finite loss, gradient not 0
    empty_streak: int = 0  # consecutive steps with a NaN loss and a zero gradient
    nonfinite_peak: int = 0  # longest streak since the previous evaluation
    empty_peak: int = 0
    evals: list[EvalPoint] = field(default_factory=list)
    recent_losses: deque[float] = field(default_factory=lambda: deque(maxlen=TRAIN_LOSS_SPAN))
    prior_lr_sum: float = 0.0  # largest lr sum of a param group before the newest telemetry
    _telemetry_lr_sum: float = 0.0
    _raw_lr_sum: float | None = None
    _lr_sum_offset: float = 0.0
    _lr_sum_history: list[tuple[int, float]] = field(default_factory=list)
    _last_step: int = 0

    @property
    def lr_sum_b(self) -> float:
        """lora_B's summed learning rate so far (telemetry, else the integrated record lr)."""
        return max(self._telemetry_lr_sum, self.lr_integrated)

    def add_training(self, record: Record, restart_step: int | None) -> None:
        integrated_before = self.lr_integrated
        if record.lr is not None and math.isfinite(record.lr):
            self.lr_seen = True
            self.lr_positive_seen |= record.lr > 0
            self.lr_integrated += record.lr * max(1, record.step - self._last_step)
        self._last_step = record.step
        self._add_loss(record)
        if record.has_telemetry:
            self._add_telemetry(record, restart_step)
            sums = zip(record.lr_sum_groups, record.lr_groups, strict=False)
            self.prior_lr_sum = max([integrated_before, *(t - lr for t, lr in sums)])

    def add_eval(self, record: Record) -> None:
        recent = list(self.recent_losses)
        before = sum(recent) / len(recent) if recent else None
        self.evals.append(EvalPoint(record.step, dict(record.eval), before))

    def _add_loss(self, record: Record) -> None:
        loss, grad = record.loss, record.grad_norm
        if loss is None:
            return
        zero_grad = grad == 0.0 or (
            grad is None
            and bool(record.matrices)
            and all(m.grad_norm == 0.0 for m in record.matrices)
        )
        # No supervised token: the gradient is exactly 0 and the loss NaN (0/0) or exactly 0
        # (the HF Trainer of transformers 5.23 logs 0.0: failure lab, labels-masked).
        empty = zero_grad and (loss == 0.0 or not math.isfinite(loss))
        if math.isfinite(loss) and not empty:
            self.recent_losses.append(loss)
            for point in self.evals[-3:]:
                if point.loss_before is None and len(point.losses_after) < TRAIN_LOSS_SPAN:
                    point.losses_after.append(loss)
            self.nonfinite_streak = self.empty_streak = 0
            return
        if not math.isfinite(loss):
            self.nan_loss_steps += 1
        if empty:
            self.empty_streak += 1
            self.nonfinite_streak = 0
        else:
            self.nonfinite_streak += 1
            self.empty_streak = 0
        self.nonfinite_peak = max(self.nonfinite_peak, self.nonfinite_streak)
        self.empty_peak = max(self.empty_peak, self.empty_streak)

    def _add_telemetry(self, record: Record, restart_step: int | None) -> None:
        self.telemetry = record
        for m in record.of("A"):
            if is_finite(m.param_norm_init) and (m.layer, m.module) not in self.a_init:
                self.a_init[(m.layer, m.module)] = m.param_norm_init  # type: ignore[assignment]
        raw = _b_lr_sum(record)
        if raw is None:
            return
        if self._raw_lr_sum is not None and raw < self._raw_lr_sum:
            # lr_sum restarts at 0 when a run resumes: continue from the checkpoint's value.
            before = [
                v for s, v in self._lr_sum_history if restart_step is None or s < restart_step
            ]
            self._lr_sum_offset = max(before, default=0.0)
        self._raw_lr_sum = raw
        self._telemetry_lr_sum = self._lr_sum_offset + raw
        self._lr_sum_history.append((record.step, self._telemetry_lr_sum))

    def end_window(self) -> None:
        """After an evaluation: window counters start over."""
        self.telemetry = None
        self.nan_loss_steps = 0
        self.nonfinite_peak, self.empty_peak = self.nonfinite_streak, self.empty_streak


def _b_lr_sum(record: Record) -> float | None:
    sums = [m.lr_sum for m in record.of("B") if is_finite(m.lr_sum)]
    if sums:
        return max(sums)  # type: ignore[type-var]
    return max(record.lr_sum_groups) if record.lr_sum_groups else None
