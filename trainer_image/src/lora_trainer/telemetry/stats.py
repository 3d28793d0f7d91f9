"""LoRA/Adam statistics as pure functions over tensors (no I/O, no distributed calls).

Everything is computed on the tensors' device and stacked, so that one collection costs a
single device-to-host transfer (`summarise` calls `.tolist()` exactly once).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# projection leaf name -> short module label (bounded label set)
MODULE_NAMES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def parse_module_name(name: str) -> tuple[int, str]:
    """(layer index, short module name) of an adapted module's path; layer -1 if none."""
    match = _LAYER.search(f".{name}.")
    leaf = name.rsplit(".", 1)[-1]
    return (int(match.group(1)) if match else -1), MODULE_NAMES.get(leaf, leaf)


def delta_w_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||B @ A||_F^2 without forming B @ A: trace((B^T B)(A A^T)) with r x r Gram matrices."""
    a32, b32 = a.float(), b.float()
    gram_b = b32.T @ b32  # r x r
    gram_a = a32 @ a32.T  # r x r
    return (gram_b * gram_a).sum().clamp_min(0.0)  # both symmetric: trace(XY) = sum(X * Y)


def dw_rel(a: torch.Tensor, b: torch.Tensor, w_norm: torch.Tensor, scale: float) -> torch.Tensor:
    """||scale * B @ A||_F / ||W||_F, factorised."""
    return abs(scale) * delta_w_sq(a, b).sqrt() / w_norm.float().clamp_min(1e-30)


def dw_rel_materialised(
    a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, scale: float
) -> torch.Tensor:
    """Reference for tests: the same ratio with B @ A formed explicitly."""
    delta = scale * (b.float() @ a.float())
    ratio: torch.Tensor = torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(w.float())
    return ratio


@dataclass(frozen=True)
class MatrixKey:
    layer: int
    module: str
    matrix: str  # "A" or "B"


@dataclass
class GradPart:
    """Gradient statistics still on the device (taken before the step, before clipping)."""

    norms: torch.Tensor  # [n] L2 norm per matrix (0 where the grad is None)
    zero_fraction: torch.Tensor  # [n] fraction of elements exactly 0
    nonfinite: torch.Tensor  # [] count of non-finite grad elements (all tracked tensors)
    extra_sq: torch.Tensor  # [] sum of squared grad norms of other trainable params
    none: list[bool]  # per matrix: grad is None


def grad_part(
    grads: Sequence[torch.Tensor | None],
    extra: Sequence[torch.Tensor | None] = (),
    device: torch.device | None = None,
) -> GradPart:
    """Per-matrix grad norm and exact-zero fraction, batched (torch._foreach_norm); no sync."""
    dev = device or next((g.device for g in grads if g is not None), torch.device("cpu"))
    present = [g for g in grads if g is not None]
    norms_p = _norms(present, dev)
    zeros_p = (
        torch.stack([(g == 0).sum().float() / max(g.numel(), 1) for g in present]).to(dev)
        if present
        else torch.zeros(0, device=dev)
    )
    idx = [i for i, g in enumerate(grads) if g is not None]
    norms = torch.zeros(len(grads), device=dev)
    zero_fraction = torch.zeros(len(grads), device=dev)
    if idx:
        where = torch.tensor(idx, device=dev)
        norms = norms.index_copy(0, where, norms_p)
        zero_fraction = zero_fraction.index_copy(0, where, zeros_p)
    others = [g for g in extra if g is not None]
    all_present = present + others
    nonfinite = (
        torch.stack([(~torch.isfinite(g)).sum().float().to(dev) for g in all_present]).sum()
        if all_present
        else torch.zeros((), device=dev)
    )
    extra_sq = (_norms(others, dev) ** 2).sum()
    return GradPart(norms, zero_fraction, nonfinite, extra_sq, [g is None for g in grads])


def _norms(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, device=device)
    same = all(t.device == device for t in tensors)
    ts = list(tensors) if same else [t.to(device) for t in tensors]
    return torch.stack([n.float() for n in torch._foreach_norm(ts)])


@dataclass(frozen=True)
class MatrixStats:
    """One lora_A or lora_B matrix of one adapted module at one step."""

    layer: int
    module: str
    matrix: str
    grad_norm: float | None  # L2, before clipping; None when the grad is None
    grad_zero_fraction: float | None  # elements exactly 0
    grad_none: int  # 1 when the grad is None
    param_norm: float  # after the step
    param_norm_init: float  # at step 0 (first collection, before its step)
    param_norm_ratio: float  # param_norm / param_norm_init (inf/nan when init is 0)
    update_ratio: float  # ||p_after - p_before|| / ||p_before||
    exp_avg_norm: float | None  # Adam first moment, L2; None without Adam state
    exp_avg_sq_mean: float | None  # Adam second moment, mean
    lr_sum: float  # cumulative lr of this matrix's param group, through this step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModuleStats:
    layer: int
    module: str
    dw_rel: float  # ||scale * B @ A||_F / ||W||_F after the step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepStats:
    """Everything one collection produced; `to_record` flattens it for trace.jsonl."""

    step: int  # optimizer steps done after the step these statistics describe
    lr: list[float]  # per param group, the lr used by this step
    lr_sum: list[float]  # per param group, cumulative
    lora_grad_norm: float  # total L2 grad norm (tracked trainable params), before clipping
    grad_none: int  # tracked LoRA matrices without a grad
    nonfinite_grad: int
    nonfinite_param: int
    nonfinite_exp_avg_sq: int
    matrices: list[MatrixStats] = field(default_factory=list)
    modules: list[ModuleStats] = field(default_factory=list)
    loss: float | None = None  # filled from the step's log record (not in to_record)

    def to_record(self) -> dict[str, Any]:
        return {
            "lr_groups": self.lr,
            "lr_sum_groups": self.lr_sum,
            "lora_grad_norm": self.lora_grad_norm,
            "grad_none": self.grad_none,
            "nonfinite_grad": self.nonfinite_grad,
            "nonfinite_param": self.nonfinite_param,
            "nonfinite_exp_avg_sq": self.nonfinite_exp_avg_sq,
            "lora": [m.to_dict() for m in self.matrices],
            "lora_modules": [m.to_dict() for m in self.modules],
        }


def summarise(
    step: int,
    keys: Sequence[MatrixKey],
    grads: GradPart,
    before: Sequence[torch.Tensor],
    after: Sequence[torch.Tensor],
    exp_avg: Sequence[torch.Tensor | None],
    exp_avg_sq: Sequence[torch.Tensor | None],
    pairs: Sequence[tuple[int, int, float]],
    w_norms: torch.Tensor,
    init_norms: Sequence[float] | None,
    lr: Sequence[float],
    lr_sum: Sequence[float],
    matrix_group: Sequence[int],
) -> StepStats:
    """Combine the pre-step grad part with post-step params/Adam state; ONE host sync.

    `pairs[j]` = (index of A, index of B, scale) of adapted module j, whose base weight norm
    is `w_norms[j]`. `init_norms` None means: this is the first collection, `before` is the
    initial state.
    """
    n = len(keys)
    dev = grads.norms.device
    before_n = _norms(before, dev)
    after_n = _norms(after, dev)
    diffs = torch._foreach_sub([a.to(dev) for a in after], [b.to(dev) for b in before])
    upd = _norms(diffs, dev) / before_n  # inf when p moved off 0, NaN when it stayed 0
    have_m = [t is not None for t in exp_avg]
    have_v = [t is not None for t in exp_avg_sq]
    m_norm = _norms([t for t in exp_avg if t is not None], dev)
    present_v = [t for t in exp_avg_sq if t is not None]
    v_mean = (
        torch.stack([t.float().mean().to(dev) for t in present_v])
        if present_v
        else torch.zeros(0, device=dev)
    )
    nf_param = _nonfinite(after, dev)
    nf_v = _nonfinite(present_v, dev)
    dws = (
        torch.stack(
            [
                dw_rel(after[a].to(dev), after[b].to(dev), w_norms[j], s)
                for j, (a, b, s) in enumerate(pairs)
            ]
        )
        if pairs
        else torch.zeros(0, device=dev)
    )
    total = ((grads.norms**2).sum() + grads.extra_sq).sqrt()
    scalars = torch.stack([total, grads.nonfinite.float(), nf_param, nf_v])
    flat = torch.cat(
        [
            grads.norms.float(),
            grads.zero_fraction.float(),
            before_n,
            after_n,
            upd,
            m_norm,
            v_mean,
            dws,
            scalars,
        ]
    ).tolist()  # the one device-to-host sync
    pos = 0

    def take(k: int) -> list[float]:
        nonlocal pos
        out = flat[pos : pos + k]
        pos += k
        return out

    g_norm, g_zero, b_norm, a_norm, u_ratio = (take(n) for _ in range(5))
    m_vals, v_vals = iter(take(len(m_norm))), iter(take(len(v_mean)))
    dw_vals = take(len(pairs))
    total_v, nf_g, nf_p, nf_vv = take(4)
    init = list(init_norms) if init_norms is not None else b_norm
    matrices = []
    for i, key in enumerate(keys):
        none = grads.none[i]
        m = next(m_vals) if have_m[i] else None
        v = next(v_vals) if have_v[i] else None
        ratio = (
            a_norm[i] / init[i]
            if init[i] != 0
            else (float("nan") if a_norm[i] == 0 else float("inf"))
        )
        matrices.append(
            MatrixStats(
                layer=key.layer,
                module=key.module,
                matrix=key.matrix,
                grad_norm=None if none else g_norm[i],
                grad_zero_fraction=None if none else g_zero[i],
                grad_none=int(none),
                param_norm=a_norm[i],
                param_norm_init=init[i],
                param_norm_ratio=ratio,
                update_ratio=u_ratio[i],
                exp_avg_norm=m,
                exp_avg_sq_mean=v,
                lr_sum=lr_sum[matrix_group[i]] if lr_sum else 0.0,
            )
        )
    modules = [
        ModuleStats(keys[a].layer, keys[a].module, dw_vals[j]) for j, (a, _, _) in enumerate(pairs)
    ]
    return StepStats(
        step=step,
        lr=list(lr),
        lr_sum=list(lr_sum),
        lora_grad_norm=total_v,
        grad_none=sum(grads.none),
        nonfinite_grad=int(nf_g),
        nonfinite_param=int(nf_p),
        nonfinite_exp_avg_sq=int(nf_vv),
        matrices=matrices,
        modules=modules,
    )


def _nonfinite(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), device=device)
    return torch.stack([(~torch.isfinite(t)).sum().float().to(device) for t in tensors]).sum()


def _ratio(num: float, den: float) -> float:
    """num / den with IEEE semantics for den == 0 (inf, or NaN for 0 / 0)."""
    if den != 0:
        return num / den
    return float("nan") if num == 0 else math.copysign(math.inf, num)
