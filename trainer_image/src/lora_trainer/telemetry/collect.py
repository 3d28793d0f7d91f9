"""Collect LoRA/Adam statistics between backward and the optimizer step.

Plain/DDP: gradients are read before clipping (a wrapper around the Trainer's
`_clip_grad_norm`, or the optimizer's step pre-hook when clipping is off), parameters are
copied in the step pre-hook, and the step post-hook reads the updated parameters and the
Adam state. DeepSpeed: HF callbacks run too late (accelerate steps the engine inside
`backward()`), so the engine's `step` is wrapped and the `deepspeed.utils.safe_get_full_*`
collectives are called on EVERY rank in the same order; only global rank 0 keeps results.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState

from lora_trainer.telemetry.stats import (
    GradPart,
    MatrixKey,
    StepStats,
    grad_part,
    parse_module_name,
    summarise,
)

log = logging.getLogger(__name__)
ADAPTER = "default"
_KEEP = 8  # results kept for on_log to pick up


@dataclass
class Tracked:
    """The adapted matrices (A and B of each LoRA module) and other trainable params."""

    names: list[str] = field(default_factory=list)
    keys: list[MatrixKey] = field(default_factory=list)
    params: list[torch.nn.Parameter] = field(default_factory=list)
    pairs: list[tuple[int, int, float]] = field(default_factory=list)  # (A idx, B idx, scale)
    bases: list[torch.nn.Parameter] = field(default_factory=list)  # base W per pair
    extra: list[torch.nn.Parameter] = field(default_factory=list)  # other trainable params


def find_lora(model: torch.nn.Module, adapter: str = ADAPTER) -> Tracked:
    """Every peft LoRA layer's trainable A/B weights, in module order."""
    from peft.tuners.lora import LoraLayer

    t = Tracked()
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        layer, short = parse_module_name(name)
        lora: Any = module  # torch's Module.__getattr__ types attributes as Tensor | Module
        a: torch.nn.Parameter = lora.lora_A[adapter].weight
        b: torch.nn.Parameter = lora.lora_B[adapter].weight
        idx = []
        for matrix, p in (("A", a), ("B", b)):
            idx.append(len(t.params))
            t.names.append(f"{name}.lora_{matrix}")
            t.keys.append(MatrixKey(layer, short, matrix))
            t.params.append(p)
            seen.add(id(p))
        t.pairs.append((idx[0], idx[1], float(module.scaling[adapter])))
        base: torch.nn.Parameter = lora.get_base_layer().weight
        t.bases.append(base)
    t.extra = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    return t


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's AcceleratedOptimizer (which also subclasses it)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    assert isinstance(optimizer, torch.optim.Optimizer)
    return optimizer


class TelemetryCollector(TrainerCallback):
    """HF callback that installs the hooks at train begin and hands out per-step results.

    `fields(step)` returns the trace.jsonl fields of a collected step (rank 0; `{}` otherwise).
    `subscribers` are called with each StepStats on global rank 0 (e.g. the exporter).
    """

    def __init__(self, interval_steps: int = 10) -> None:
        self.interval = max(1, interval_steps)
        self.trainer: Any = None
        self.tracked = Tracked()
        self.results: OrderedDict[int, StepStats] = OrderedDict()
        self.latest: StepStats | None = None
        self.latest_time = 0.0  # unix time of `latest`
        self.subscribers: list[Callable[[StepStats], None]] = []
        self.lr_sum: list[float] = []
        self._init_norms: list[float] | None = None
        self._w_norms: torch.Tensor | None = None
        self._grads: GradPart | None = None
        self._grads_step = -1  # the step `_grads` was read for (a skipped step leaves it)
        self._before: list[torch.Tensor] = []
        self._group_of: list[int] = []
        self._lr: list[float] = []
        self._installed = False
        self.mode = ""

    def attach(self, trainer: Any) -> None:
        self.trainer = trainer

    def due(self, step_after: int) -> bool:
        """Collect at the first step (and step 1) and every `interval` steps."""
        return step_after <= 1 or step_after % self.interval == 0

    @property
    def is_rank_zero(self) -> bool:
        return bool(self.trainer is None or self.trainer.args.process_index == 0)

    def fields(self, step: int) -> dict[str, Any]:
        stats = self.results.pop(step, None)
        return stats.to_record() if stats is not None else {}

    # -- HF callback events -------------------------------------------------------------

    def on_train_begin(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._install()

    def on_step_begin(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._install()  # in case the engine/optimizer appeared only after train begin

    def on_log(
        self,
        args: Any,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        stats = self.results.get(state.global_step)
        if stats is not None and logs and "loss" in logs:
            stats.loss = float(logs["loss"])

    # -- installation -------------------------------------------------------------------

    def _install(self) -> None:
        if self._installed or self.trainer is None:
            return
        trainer = self.trainer
        engine = trainer.model_wrapped
        if getattr(trainer, "is_deepspeed_enabled", False):
            if not hasattr(engine, "is_gradient_accumulation_boundary"):
                return  # the engine does not exist yet
            self.tracked = find_lora(engine.module)
            self._wrap_engine(engine)
            self.mode = "deepspeed"
        else:
            if trainer.optimizer is None:
                return
            self.tracked = find_lora(trainer.model)
            optimizer = _unwrap_optimizer(trainer.optimizer)
            self._group_of = _group_index(optimizer, self.tracked.params)
            optimizer.register_step_pre_hook(self._pre_step)
            optimizer.register_step_post_hook(self._post_step)
            self._wrap_clip(trainer)
            self.mode = "torch"
        self._installed = True
        log.info(
            "telemetry: %d LoRA matrices, every %d steps (%s)",
            len(self.tracked.params),
            self.interval,
            self.mode,
        )

    def _step_after(self) -> int:
        return int(self.trainer.state.global_step) + 1

    def _accumulate_lr(self, lrs: list[float]) -> None:
        if len(self.lr_sum) != len(lrs):
            self.lr_sum = [0.0] * len(lrs)
        self.lr_sum = [s + lr for s, lr in zip(self.lr_sum, lrs, strict=True)]
        self._lr = lrs

    # -- plain / DDP --------------------------------------------------------------------

    def _wrap_clip(self, trainer: Any) -> None:
        original = getattr(trainer, "_clip_grad_norm", None)
        if original is None:
            return  # other transformers versions: the pre-hook reads (clipped) grads

        def clip(*args: Any, **kwargs: Any) -> Any:
            step = self._step_after()
            if self.due(step):
                part = self._grad_part([p.grad for p in self.tracked.params])
                # fp16 AMP: grads are still multiplied by the loss scale here (accelerate
                # unscales inside clip_grad_norm_); divide on the device, no sync
                scale = getattr(getattr(trainer.accelerator, "scaler", None), "_scale", None)
                if isinstance(scale, torch.Tensor):
                    inv = 1.0 / scale.to(part.norms.device).float()
                    part.norms = part.norms * inv
                    part.extra_sq = part.extra_sq * inv * inv
                self._grads, self._grads_step = part, step
            return original(*args, **kwargs)

        trainer._clip_grad_norm = clip

    def _grad_part(self, grads: list[torch.Tensor | None]) -> GradPart:
        return grad_part(grads, [p.grad for p in self.tracked.extra])

    def _pre_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        self._accumulate_lr([float(g["lr"]) for g in optimizer.param_groups])
        step = self._step_after()
        if not self.due(step):
            self._grads = None
            return
        if self._grads is None or self._grads_step != step:
            # no clipping (or no wrapper): the grads here are still the raw ones
            self._grads = self._grad_part([p.grad for p in self.tracked.params])
        self._before = [p.detach().clone() for p in self.tracked.params]
        if self._w_norms is None:
            self._w_norms = _w_norms([b.detach() for b in self.tracked.bases])

    def _post_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        grads, self._grads = self._grads, None
        if grads is None or not self.is_rank_zero:
            return
        state = optimizer.state
        self._finish(
            grads,
            [p.detach() for p in self.tracked.params],
            [state.get(p, {}).get("exp_avg") for p in self.tracked.params],
            [state.get(p, {}).get("exp_avg_sq") for p in self.tracked.params],
        )

    # -- DeepSpeed ----------------------------------------------------------------------

    def _wrap_engine(self, engine: Any) -> None:
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_grad,
            safe_get_full_optimizer_state,
        )

        original = engine.step
        params = self.tracked.params
        self._group_of = [0] * len(params)

        def step(*args: Any, **kwargs: Any) -> Any:
            if not engine.is_gradient_accumulation_boundary():
                return original(*args, **kwargs)
            self._accumulate_lr([float(x) for x in engine.get_lr()])
            if not self.due(self._step_after()):
                return original(*args, **kwargs)
            # collectives: every rank, same order
            grads = [safe_get_full_grad(p) for p in params]
            extra = [safe_get_full_grad(p) for p in self.tracked.extra]
            before = [safe_get_full_fp32_param(p).detach().clone() for p in params]
            if self._w_norms is None:
                self._w_norms = _gathered_w_norms(self.tracked.bases)
            part = grad_part(grads, extra)
            out = original(*args, **kwargs)
            after = [safe_get_full_fp32_param(p).detach() for p in params]
            exp_avg = [safe_get_full_optimizer_state(p, "exp_avg") for p in params]
            exp_avg_sq = [safe_get_full_optimizer_state(p, "exp_avg_sq") for p in params]
            if self.is_rank_zero:
                self._before = before
                self._finish(part, after, exp_avg, exp_avg_sq)
            return out

        engine.step = step

    # -- common -------------------------------------------------------------------------

    def _finish(
        self,
        grads: GradPart,
        after: list[torch.Tensor],
        exp_avg: list[torch.Tensor | None],
        exp_avg_sq: list[torch.Tensor | None],
    ) -> None:
        assert self._w_norms is not None
        stats = summarise(
            step=self._step_after(),
            keys=self.tracked.keys,
            grads=grads,
            before=self._before,
            after=after,
            exp_avg=exp_avg,
            exp_avg_sq=exp_avg_sq,
            pairs=self.tracked.pairs,
            w_norms=self._w_norms.to(grads.norms.device),
            init_norms=self._init_norms,
            lr=self._lr,
            lr_sum=self.lr_sum,
            matrix_group=self._group_of,
        )
        self._before = []
        if self._init_norms is None:
            self._init_norms = [m.param_norm_init for m in stats.matrices]
        self.results[stats.step] = stats
        while len(self.results) > _KEEP:
            self.results.popitem(last=False)
        self.latest = stats
        self.latest_time = time.time()
        for subscriber in self.subscribers:
            try:
                subscriber(stats)
            except Exception:  # telemetry must never stop training
                log.exception("telemetry subscriber failed")


def _group_index(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> list[int]:
    where = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    return [where.get(id(p), 0) for p in params]


def _w_norms(weights: list[torch.Tensor]) -> torch.Tensor:
    if not weights:
        return torch.zeros(0)
    return torch.stack([n.float() for n in torch._foreach_norm(weights)])


def _gathered_w_norms(weights: list[torch.nn.Parameter]) -> torch.Tensor:
    """Base weight norms; under ZeRO-3 the frozen weights are gathered (collective)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(weights, modifier_rank=None):
        return _w_norms([w.detach().float().clone() for w in weights])
