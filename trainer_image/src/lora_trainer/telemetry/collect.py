"""Collect LoRA/Adam statistics between backward and the optimizer step.

Plain/DDP (mode "torch", global rank 0 only; DDP grads are already averaged): gradients are
read before clipping (a wrapper around the Trainer's `_clip_grad_norm`, or the optimizer's
step pre-hook when clipping is off), parameters are snapshotted in the step pre-hook and the
step post-hook reads the updated parameters and the Adam state.

DeepSpeed: HF callbacks run too late (accelerate steps the engine inside `backward()`), so
the engine's `step` is wrapped. ZeRO-1/2 ("zero-fragments"): every rank reduces the slices
of the fp32 gradients, master parameters and Adam state it owns (DeepSpeed's `_hp_mapping`
fragments) into per-matrix sums, and ONE all_reduce adds them up; dW_rel comes from the full
bit16 weights every rank holds after the step. ZeRO-3 ("zero-gathered"): the
`deepspeed.utils.safe_get_full_*` collectives, called on every rank in the same order.

All statistics of a collection are packed into one vector on the device (see `stats`), so a
collection costs one device-to-host copy, which on CUDA is asynchronous (read a step late).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState

from lora_trainer.telemetry.stats import (
    Layout,
    MatrixKey,
    Segments,
    StepStats,
    delta_w_sq_grouped,
    grad_sums,
    pack,
    param_sums,
    parse_module_name,
    shape_groups,
    unpack,
)

log = logging.getLogger(__name__)
ADAPTER = "default"
_KEEP = 8  # decoded results kept for the trace writer to pick up
_MAX_PENDING = 4  # collections still in pinned host memory, not yet decoded


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


@dataclass
class _Pending:
    """A packed collection whose device-to-host copy may still be in flight."""

    step: int
    host: torch.Tensor
    event: Any  # torch.cuda.Event, or None when the copy was synchronous
    none: list[bool]
    have_state: list[bool]
    lr: list[float]
    lr_sum: list[float]


class TelemetryCollector(TrainerCallback):
    """HF callback that installs the hooks at train begin and hands out per-step results.

    `fields(step)` returns the trace.jsonl fields of a collected step (rank 0; `{}` otherwise).
    `subscribers` are called with each StepStats on global rank 0 (e.g. the exporter).

    On CUDA the packed statistics are copied to pinned host memory without blocking and
    decoded only when asked for (`fields`, usually from the trace writer's thread), when
    too many are pending, or at the end of training, so the training loop never waits for
    the GPU or spends time decoding on its critical path. Collections are decoded in step
    order (the first one defines the initial norms).
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
        self.mode = ""  # torch | zero-fragments | zero-gathered
        self._installed = False
        self._init_norms: list[float] | None = None
        self._seg: Segments | None = None
        self._layout: Layout | None = None
        self._groups: list[list[int]] = []
        self._group_of: list[int] = []
        self._lr: list[float] = []
        self._grads: tuple[torch.Tensor, torch.Tensor] | None = None
        self._grads_step = -1  # the step `_grads` was read for (a skipped step leaves it)
        self._none: list[bool] = []
        self._before: torch.Tensor | None = None
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._free: list[torch.Tensor] = []  # pinned host buffers ready for reuse
        self._losses: dict[int, float] = {}
        self._lock = threading.RLock()

    def attach(self, trainer: Any) -> None:
        self.trainer = trainer

    def due(self, step_after: int) -> bool:
        """Collect at the first step (and step 1) and every `interval` steps."""
        return step_after <= 1 or step_after % self.interval == 0

    @property
    def is_rank_zero(self) -> bool:
        return bool(self.trainer is None or self.trainer.args.process_index == 0)

    def fields(self, step: int) -> dict[str, Any]:
        """trace.jsonl fields of a collected step (decodes it if still pending); thread-safe."""
        with self._lock:
            self._resolve(step)
            stats = self.results.pop(step, None)
        return stats.to_record() if stats is not None else {}

    def flush(self) -> None:
        """Decode and publish every pending collection (waits for their copies)."""
        with self._lock:
            self._resolve(None)

    def _resolve(self, upto: int | None) -> None:
        """Decode pending collections in step order, through step `upto` (None: all)."""
        while self._pending and self._layout is not None:
            step, pending = next(iter(self._pending.items()))
            if upto is not None and step > upto:
                return
            del self._pending[step]
            if pending.event is not None:
                pending.event.synchronize()
            values = pending.host.tolist()
            if pending.event is not None:
                self._free.append(pending.host)
            stats = unpack(
                values,
                self._layout,
                step=pending.step,
                none=pending.none,
                have_state=pending.have_state,
                init_norms=self._init_norms,
                lr=pending.lr,
                lr_sum=pending.lr_sum,
                matrix_group=self._group_of,
            )
            stats.loss = self._losses.pop(step, None)
            self._publish(stats)

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
        if not logs or "loss" not in logs:
            return
        with self._lock:
            stats = self.results.get(state.global_step)
            if stats is not None:
                stats.loss = float(logs["loss"])
            elif state.global_step in self._pending:
                self._losses[state.global_step] = float(logs["loss"])

    def on_train_end(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.flush()

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
            self._group_of = [0] * len(self.tracked.params)
            fragments = all(hasattr(p, "_hp_mapping") for p in self.tracked.params)
            stage = int(engine.zero_optimization_stage())
            if fragments and stage in (1, 2):
                self._wrap_engine(engine, self._collect_fragments)
                self.mode = "zero-fragments"
            else:
                self._wrap_engine(engine, self._collect_gathered)
                self.mode = "zero-gathered"
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

    def _setup(
        self,
        numels: list[int],
        device: torch.device,
        w_norms: list[float],
        spans: list[tuple[int, int]] | None = None,
    ) -> None:
        """Segments of this rank's fragments and the layout (first collection only)."""
        if self._seg is not None:
            return
        t = self.tracked
        self._seg = Segments(numels, device, spans)
        self._groups = shape_groups(
            [(tuple(t.params[a].shape), tuple(t.params[b].shape)) for a, b, _ in t.pairs]
        )
        self._layout = Layout(
            keys=t.keys,
            numels=[p.numel() if p.numel() else _full_numel(p) for p in t.params],
            pairs=t.pairs,
            module_order=[j for g in self._groups for j in g],
            w_norms=w_norms,
        )

    # -- plain / DDP (every process holds full grads and params; rank 0 alone collects) --

    def _wrap_clip(self, trainer: Any) -> None:
        original = getattr(trainer, "_clip_grad_norm", None)
        if original is None:
            return  # other transformers versions: the pre-hook reads (clipped) grads

        def clip(*args: Any, **kwargs: Any) -> Any:
            step = self._step_after()
            if self.is_rank_zero and self.due(step):
                self._read_grads()
                # fp16 AMP: grads are still multiplied by the loss scale here (accelerate
                # unscales inside clip_grad_norm_); divide on the device, no sync
                scale = getattr(getattr(trainer.accelerator, "scaler", None), "_scale", None)
                if isinstance(scale, torch.Tensor) and self._grads is not None:
                    rows, scalars = self._grads
                    inv2 = (1.0 / scale.to(rows.device).float()) ** 2
                    rows = torch.stack([rows[0] * inv2, rows[1]])
                    scalars = torch.stack([scalars[0], scalars[1] * inv2])
                    self._grads = (rows, scalars)
                self._grads_step = step
            return original(*args, **kwargs)

        trainer._clip_grad_norm = clip

    def _read_grads(self) -> None:
        t = self.tracked
        if self._seg is None:
            dev = t.params[0].device if t.params else torch.device("cpu")
            self._setup([p.numel() for p in t.params], dev, _w_norms(t.bases))
        assert self._seg is not None
        grads = [p.grad for p in t.params]
        self._none = [g is None for g in grads]
        self._grads = grad_sums(self._seg, grads, [p.grad for p in t.extra])

    def _pre_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        self._accumulate_lr([float(g["lr"]) for g in optimizer.param_groups])
        step = self._step_after()
        if not self.is_rank_zero or not self.due(step):
            self._grads = None
            return
        if self._grads is None or self._grads_step != step:
            self._read_grads()  # no clipping (or no wrapper): the grads here are raw
        assert self._seg is not None
        self._before = self._seg.flat([p.detach() for p in self.tracked.params])

    def _post_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        grads, self._grads = self._grads, None
        before, self._before = self._before, None
        if grads is None or before is None or self._seg is None:
            return
        params = self.tracked.params
        state = optimizer.state
        exp_avg = [state.get(p, {}).get("exp_avg") for p in params]
        exp_avg_sq = [state.get(p, {}).get("exp_avg_sq") for p in params]
        rows, scalars = param_sums(
            self._seg, before, [p.detach() for p in params], exp_avg, exp_avg_sq
        )
        packed = pack(grads[0], grads[1], rows, scalars)
        self._dispatch(packed, params, self._none, [v is not None for v in exp_avg_sq])

    # -- DeepSpeed: the engine step wrapped (ZeRO-1/2 fragments, or gathered tensors) -----

    def _wrap_engine(self, engine: Any, collect: Callable[[Callable[[], Any]], Any]) -> None:
        """Wrap the engine's step: at an accumulation boundary the lr is summed and, when a
        collection is due, `collect(run_step)` runs around the real step."""
        original = engine.step

        def step(*args: Any, **kwargs: Any) -> Any:
            if not engine.is_gradient_accumulation_boundary():
                return original(*args, **kwargs)
            self._accumulate_lr([float(x) for x in engine.get_lr()])
            if not self.due(self._step_after()):
                return original(*args, **kwargs)
            return collect(lambda: original(*args, **kwargs))

        engine.step = step

    def _collect_fragments(self, run_step: Callable[[], Any]) -> Any:
        """ZeRO-1/2: this rank's fragments, one all_reduce."""
        params, extra = self.tracked.params, self.tracked.extra
        if self._seg is None:
            numels = [p.numel() for p in params]
            spans = [_fragment_span(p) for p in params]
            self._setup(numels, params[0].device, _w_norms(self.tracked.bases), spans)
        seg = self._seg
        assert seg is not None
        g_rows, g_scalars = grad_sums(
            seg, [_grad_fragment(p) for p in params], [_grad_fragment(p) for p in extra]
        )
        before = seg.flat([_hp_fragment(p) for p in params])
        out = run_step()
        v_frags = [_state_fragment(p, "exp_avg_sq") for p in params]
        p_rows, p_scalars = param_sums(
            seg,
            before,
            [_hp_fragment(p) for p in params],
            [_state_fragment(p, "exp_avg") for p in params],
            v_frags,
        )
        packed = pack(g_rows, g_scalars, p_rows, p_scalars)
        group = getattr(params[0], "_dp_group", None) if params else None
        torch.distributed.all_reduce(packed, group=group)  # every rank, once
        if self.is_rank_zero:  # full bit16 weights are on every rank after the step
            have = [
                v is not None or _fragment_numel(p) == 0
                for v, p in zip(v_frags, params, strict=True)
            ]
            self._dispatch(packed, params, [False] * len(params), have)
        return out

    def _collect_gathered(self, run_step: Callable[[], Any]) -> Any:
        """ZeRO-3 (and anything without fragments): gathered full tensors, collectives on
        every rank in the same order."""
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_grad,
            safe_get_full_optimizer_state,
        )

        params = self.tracked.params
        grads = [safe_get_full_grad(p) for p in params]
        extra = [safe_get_full_grad(p) for p in self.tracked.extra]
        before_full = [safe_get_full_fp32_param(p) for p in params]
        if self._seg is None:
            w_norms = _gathered_w_norms(self.tracked.bases)
            device = grads[0].device if grads and grads[0] is not None else None
            numels = [t.numel() for t in before_full]
            self._setup(numels, device or torch.device("cpu"), w_norms)
        seg = self._seg
        assert seg is not None
        zero = self.is_rank_zero
        g = grad_sums(seg, grads, extra) if zero else None
        before = seg.flat(before_full) if zero else None
        out = run_step()
        after = [safe_get_full_fp32_param(p) for p in params]
        exp_avg = [safe_get_full_optimizer_state(p, "exp_avg") for p in params]
        exp_avg_sq = [safe_get_full_optimizer_state(p, "exp_avg_sq") for p in params]
        if g is not None and before is not None:
            rows, scalars = param_sums(seg, before, after, exp_avg, exp_avg_sq)
            packed = pack(g[0], g[1], rows, scalars)
            have = [v is not None for v in exp_avg_sq]
            self._dispatch(packed, after, [x is None for x in grads], have)
        return out

    # -- common -------------------------------------------------------------------------

    def _dispatch(
        self,
        packed: torch.Tensor,
        full: Sequence[torch.Tensor],
        none: list[bool],
        have_state: list[bool],
    ) -> None:
        """Append ||B@A||^2 of the full matrices and start the one device-to-host copy."""
        a = [full[i] for i, _, _ in self.tracked.pairs]
        b = [full[j] for _, j, _ in self.tracked.pairs]
        dw = delta_w_sq_grouped(a, b, self._groups).to(packed.device)
        vec = torch.cat([packed, dw])
        event = None
        host = vec
        if vec.device.type == "cuda":
            with self._lock:
                free = [b for b in self._free if b.numel() == vec.numel()]
                if free:
                    self._free.remove(free[0])
            host = free[0] if free else torch.empty(vec.numel(), pin_memory=True)
            host.copy_(vec, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        step = self._step_after()
        pending = _Pending(step, host, event, none, have_state, list(self._lr), list(self.lr_sum))
        with self._lock:
            self._pending[step] = pending
            if event is None:
                self._resolve(step)
            while len(self._pending) > _MAX_PENDING:  # nobody is asking: decode the oldest
                self._resolve(next(iter(self._pending)))

    def _publish(self, stats: StepStats) -> None:
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


# -- DeepSpeed ZeRO-1/2 fragment access (deepspeed.utils.tensor_fragment) --------------------


def _fragment_span(p: Any) -> tuple[int, int]:
    """(start, length) of the slice of `p` (flattened) this rank owns."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return 0, 0
    address = mapping.lp_fragment_address
    return int(address.start), int(address.numel)


def _fragment_numel(p: Any) -> int:
    return _fragment_span(p)[1]


def _full_numel(p: Any) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())


def _grad_fragment(p: Any) -> torch.Tensor | None:
    """This rank's slice of the reduced gradient (between backward and the engine step)."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    grad = mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
    if grad.numel() == p.numel() and mapping.lp_fragment_address.numel != p.numel():
        # bf16 keeps a full accumulation buffer on each rank: take the owned slice
        address = mapping.lp_fragment_address
        grad = grad.narrow(0, address.start, address.numel)
    return grad  # type: ignore[no-any-return]


def _hp_fragment(p: Any) -> torch.Tensor | None:
    mapping = getattr(p, "_hp_mapping", None)
    return None if mapping is None else mapping.hp_fragment.detach()


def _state_fragment(p: Any, key: str) -> torch.Tensor | None:
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None or not getattr(mapping, "optim_fragment", None):
        return None
    return mapping.optim_fragment.get(key)  # type: ignore[no-any-return]


def _group_index(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> list[int]:
    where = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    return [where.get(id(p), 0) for p in params]


def _w_norms(weights: list[torch.nn.Parameter]) -> list[float]:
    """||W||_F of the frozen base weights, in fp32 without copies (once per run: one sync)."""
    if not weights:
        return []
    norms = [torch.linalg.vector_norm(w.detach(), dtype=torch.float32) for w in weights]
    return [float(x) for x in torch.stack([n.to(norms[0].device) for n in norms]).tolist()]


def _gathered_w_norms(weights: list[torch.nn.Parameter]) -> list[float]:
    """Base weight norms; under ZeRO-3 the frozen weights are gathered (collective)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(weights, modifier_rank=None):
        return _w_norms(weights)
