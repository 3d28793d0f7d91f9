"""LoRA/Adam statistics as pure functions over tensors (no I/O, no distributed calls).

Everything is computed on the device into one flat vector of per-matrix sums (`pack`), so a
collection costs one all-reduce across ranks (ZeRO-1/2) and one device-to-host transfer;
`unpack` turns the host copy into StepStats.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
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


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: Any) -> tuple[str, ...]:
    """Dataclass field names (cached: `asdict` deep-copies and is 5x slower)."""
    if cls not in _FIELD_NAMES:
        _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return _FIELD_NAMES[cls]


@dataclass(frozen=True)
class MatrixKey:
    layer: int
    module: str
    matrix: str  # "A" or "B"


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
        return {name: getattr(self, name) for name in _field_names(type(self))}


@dataclass(frozen=True)
class ModuleStats:
    layer: int
    module: str
    dw_rel: float  # ||scale * B @ A||_F / ||W||_F after the step

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _field_names(type(self))}


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


# -- batched reductions over flattened fragments -------------------------------------------
#
# Every tracked matrix contributes one fragment: the whole tensor in a plain run, the slice
# this rank owns under ZeRO-1/2. The fragments are copied into one fp32 buffer laid out as
# full matrices grouped by size (zeros where this rank owns nothing), so that each statistic
# is one row-sum per size group (no atomics, a few dozen kernels whatever the number of
# layers), and sums of squares and counts add up exactly across ranks in one all_reduce.


GRAD_ROWS = 2  # sum of squares, exact-zero count
PARAM_ROWS = 5  # before sq, after sq, update sq, exp_avg sq, exp_avg_sq sum
SCALARS = 4  # non-finite grad, non-finite param, non-finite exp_avg_sq, other params' grad sq


class Segments:
    """The layout of the concatenated matrices (and, under ZeRO, this rank's slices)."""

    def __init__(
        self,
        numels: Sequence[int],
        device: torch.device,
        spans: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        """`numels`: full element count per matrix. `spans`: per matrix, (start, length) of
        the slice this rank holds (None: every fragment is the whole matrix)."""
        self.n = len(numels)
        self.numels = list(numels)
        self.device = device
        self.spans = list(spans) if spans is not None else None
        self.order = sorted(range(self.n), key=lambda i: self.numels[i])  # stable
        self.groups: list[tuple[int, int, int]] = []  # (offset, count, numel)
        offsets = [0] * self.n
        pos = 0
        for i in self.order:
            numel = self.numels[i]
            offsets[i] = pos
            if self.groups and self.groups[-1][2] == numel:
                off, k, _ = self.groups[-1]
                self.groups[-1] = (off, k + 1, numel)
            else:
                self.groups.append((pos, 1, numel))
            pos += numel
        self.total = pos
        inv = [0] * self.n
        for rank, i in enumerate(self.order):
            inv[i] = rank
        self.inv = torch.tensor(inv, dtype=torch.int64, device=device)
        held = [s[1] for s in self.spans] if self.spans is not None else self.numels
        pad = [float(full - h) for full, h in zip(self.numels, held, strict=True)]
        self.pad = torch.tensor(pad, device=device)  # elements this rank does not hold
        self.dst: torch.Tensor | None = None
        if self.spans is not None:
            idx = [
                torch.arange(offsets[i] + self.spans[i][0], offsets[i] + sum(self.spans[i]))
                for i in self.order
            ]
            self.dst = torch.cat(idx).to(device) if idx else torch.zeros(0, dtype=torch.int64)

    def _held(self, i: int) -> int:
        return self.spans[i][1] if self.spans is not None else self.numels[i]

    def flat(self, fragments: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """The fp32 buffer of all matrices (missing fragments and unheld slices are 0)."""
        parts = [
            f.reshape(-1) if f is not None else torch.zeros(self._held(i), device=self.device)
            for i in self.order
            if self._held(i) > 0
            for f in (fragments[i],)
        ]
        if not parts:
            return torch.zeros(self.total, device=self.device)
        if len({(p.dtype, p.device) for p in parts}) == 1:
            held = torch.cat(parts).to(self.device, torch.float32)
        else:
            held = torch.cat([p.to(self.device, torch.float32) for p in parts])
        if self.dst is None:
            return held
        buf = torch.zeros(self.total, device=self.device)
        return buf.index_copy_(0, self.dst, held)

    def sums(self, values: torch.Tensor) -> torch.Tensor:
        """Per-matrix sums (matrix order) of a buffer laid out like `flat`'s."""
        if not self.groups:
            return torch.zeros(self.n, device=self.device)
        rows = [
            values[off : off + k * numel].view(k, numel).sum(1) for off, k, numel in self.groups
        ]
        return torch.cat(rows).index_select(0, self.inv)

    def zero_counts(self, values: torch.Tensor) -> torch.Tensor:
        """Per-matrix count of exact zeros among the elements this rank holds."""
        return self.sums((values == 0).float()) - self.pad


def nonfinite_count(x: torch.Tensor) -> torch.Tensor:
    return (~torch.isfinite(x)).sum().float()


def grad_sums(
    seg: Segments,
    grads: Sequence[torch.Tensor | None],
    extra: Sequence[torch.Tensor | None] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """([2, n] per-matrix grad sum of squares and exact-zero count, [2] scalars:
    non-finite grad elements (tracked and other params), other params' grad sum of squares).
    No host sync."""
    g = seg.flat(grads)
    rows = torch.stack([seg.sums(g * g), seg.zero_counts(g)])
    others = [e for e in extra if e is not None]
    nonfinite = nonfinite_count(g)
    extra_sq = torch.zeros((), device=seg.device)
    if others:
        norms = torch._foreach_norm([e.to(seg.device) for e in others])
        extra_sq = torch.stack([n.float() ** 2 for n in norms]).sum()
        nonfinite = nonfinite + sum(nonfinite_count(e.to(seg.device)) for e in others)
    return rows, torch.stack([nonfinite, extra_sq])


def param_sums(
    seg: Segments,
    before: torch.Tensor,
    after: Sequence[torch.Tensor | None],
    exp_avg: Sequence[torch.Tensor | None],
    exp_avg_sq: Sequence[torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """([5, n] per-matrix sums: before^2, after^2, (after-before)^2, exp_avg^2, exp_avg_sq;
    [2] scalars: non-finite param elements, non-finite exp_avg_sq elements). `before` is
    `seg.flat(params)` taken before the step. No host sync."""
    p = seg.flat(after)
    d = p - before
    m = seg.flat(exp_avg)
    v = seg.flat(exp_avg_sq)
    rows = torch.stack(
        [seg.sums(before * before), seg.sums(p * p), seg.sums(d * d), seg.sums(m * m), seg.sums(v)]
    )
    return rows, torch.stack([nonfinite_count(p), nonfinite_count(v)])


def pack(
    grad_rows: torch.Tensor,
    grad_scalars: torch.Tensor,
    param_rows: torch.Tensor,
    param_scalars: torch.Tensor,
) -> torch.Tensor:
    """One flat vector of sums: what ranks all-reduce (SUM) under ZeRO-1/2."""
    scalars = torch.stack([grad_scalars[0], param_scalars[0], param_scalars[1], grad_scalars[1]])
    return torch.cat([grad_rows.reshape(-1), param_rows.reshape(-1), scalars])


def shape_groups(shapes: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[list[int]]:
    """Module indices grouped by (A shape, B shape), so each group is one batched matmul."""
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for j, key in enumerate(shapes):
        groups.setdefault(key, []).append(j)
    return list(groups.values())


def delta_w_sq_grouped(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], groups: Sequence[Sequence[int]]
) -> torch.Tensor:
    """||B_j @ A_j||_F^2 of every module, batched per shape group (bmm of r x r Grams);
    the result is in the order of the concatenated groups."""
    out = []
    for idx in groups:
        big_a = torch.stack([a[j].detach() for j in idx]).float()  # [k, r, in]
        big_b = torch.stack([b[j].detach() for j in idx]).float()  # [k, out, r]
        gram_a = torch.bmm(big_a, big_a.transpose(1, 2))
        gram_b = torch.bmm(big_b.transpose(1, 2), big_b)
        out.append((gram_a * gram_b).sum((1, 2)).clamp_min(0.0))
    return torch.cat(out) if out else torch.zeros(0)


@dataclass(frozen=True)
class Layout:
    """What a packed vector describes: matrices, their full sizes, modules."""

    keys: Sequence[MatrixKey]
    numels: Sequence[int]  # full element count per matrix (not per fragment)
    pairs: Sequence[tuple[int, int, float]]  # (A index, B index, scale) per module
    module_order: Sequence[int]  # module index of each ||B@A||^2 value, as packed
    w_norms: Sequence[float]  # ||W||_F of each module's frozen base weight


def unpack(
    values: Sequence[float],
    layout: Layout,
    step: int,
    none: Sequence[bool],
    have_state: Sequence[bool],
    init_norms: Sequence[float] | None,
    lr: Sequence[float],
    lr_sum: Sequence[float],
    matrix_group: Sequence[int],
) -> StepStats:
    """StepStats from the host copy of `pack(...)` followed by the `delta_w_sq_grouped`
    values; dw_rel = |scale| * sqrt(||B@A||^2) / ||W||."""
    n = len(layout.keys)
    rows = [values[i * n : (i + 1) * n] for i in range(GRAD_ROWS + PARAM_ROWS)]
    g_sq, g_zero, b_sq, a_sq, d_sq, m_sq, v_sum = rows
    pos = (GRAD_ROWS + PARAM_ROWS) * n
    nf_g, nf_p, nf_v, extra_sq = values[pos : pos + SCALARS]
    dw_packed = values[pos + SCALARS :]
    dws = [0.0] * len(layout.pairs)
    for j, sq in zip(layout.module_order, dw_packed, strict=True):
        scale = abs(layout.pairs[j][2])
        dws[j] = _ratio(scale * _sqrt(sq), layout.w_norms[j])
    b_norm = [_sqrt(x) for x in b_sq]
    init = list(init_norms) if init_norms is not None else b_norm
    matrices = []
    for i, key in enumerate(layout.keys):
        numel = max(layout.numels[i], 1)
        after = _sqrt(a_sq[i])
        matrices.append(
            MatrixStats(
                layer=key.layer,
                module=key.module,
                matrix=key.matrix,
                grad_norm=None if none[i] else _sqrt(g_sq[i]),
                grad_zero_fraction=None if none[i] else g_zero[i] / numel,
                grad_none=int(none[i]),
                param_norm=after,
                param_norm_init=init[i],
                param_norm_ratio=_ratio(after, init[i]),
                update_ratio=_ratio(_sqrt(d_sq[i]), b_norm[i]),
                exp_avg_norm=_sqrt(m_sq[i]) if have_state[i] else None,
                exp_avg_sq_mean=v_sum[i] / numel if have_state[i] else None,
                lr_sum=lr_sum[matrix_group[i]] if lr_sum else 0.0,
            )
        )
    modules = [
        ModuleStats(layout.keys[a].layer, layout.keys[a].module, dws[j])
        for j, (a, _, _) in enumerate(layout.pairs)
    ]
    return StepStats(
        step=step,
        lr=list(lr),
        lr_sum=list(lr_sum),
        lora_grad_norm=_sqrt(sum(g_sq) + extra_sq),
        grad_none=sum(bool(x) for x in none),
        nonfinite_grad=_count(nf_g),
        nonfinite_param=_count(nf_p),
        nonfinite_exp_avg_sq=_count(nf_v),
        matrices=matrices,
        modules=modules,
    )


def _sqrt(x: float) -> float:
    return math.sqrt(x) if x >= 0 else float("nan")  # NaN stays NaN, inf stays inf


def _count(x: float) -> int:
    return int(x) if math.isfinite(x) else -1


def _ratio(num: float, den: float) -> float:
    """num / den with IEEE semantics for den == 0 (inf, or NaN for 0 / 0)."""
    if den != 0:
        return num / den
    if math.isnan(num) or num == 0:
        return float("nan")
    return math.copysign(math.inf, num)
