"""Packing several samples per row, and the collator that keeps them from seeing each other."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import torch

if TYPE_CHECKING:
    from lora_trainer.data import Encoded

IGNORE_INDEX = -100
PADDING_SEQUENCE = -1


@dataclass
class PackedRow:
    """Samples laid end to end; positions restart at 0 and sequence_ids tell samples apart."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    sequence_ids: list[int]


Example: TypeAlias = "Encoded | PackedRow"


def _row(samples: Sequence[Encoded]) -> PackedRow:
    row = PackedRow([], [], [], [])
    for index, sample in enumerate(samples):
        size = len(sample.input_ids)
        row.input_ids += sample.input_ids
        # The first label is never scored unpacked (labels are shifted); packed, it would be
        # scored against the previous sample's last token, so it is masked.
        row.labels += [IGNORE_INDEX, *sample.labels[1:]]
        row.position_ids += range(size)
        row.sequence_ids += [index] * size
    return row


def pack(encoded: Sequence[Encoded], max_length: int) -> list[PackedRow]:
    """Best-fit-decreasing packing into rows of at most `max_length` tokens (deterministic)."""
    rows: list[list[Encoded]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    for index in order:
        sample = encoded[index]
        size = len(sample.input_ids)
        if size == 0:
            continue
        if size > max_length:
            raise ValueError(f"sample of {size} tokens does not fit max_length {max_length}")
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            rows.append([sample])
            bisect.insort(free, (max_length - size, len(rows) - 1))
        else:
            room, row = free.pop(at)
            rows[row].append(sample)
            bisect.insort(free, (room - size, row))
    return [_row(samples) for samples in rows]


def _as_row(item: Example) -> PackedRow:
    if isinstance(item, PackedRow):
        return item
    size = len(item.input_ids)
    return PackedRow(list(item.input_ids), list(item.labels), list(range(size)), [0] * size)


def block_causal_mask(sequence_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, L, L) bool: query i sees key j iff j <= i and both are in the same sample."""
    width = sequence_ids.shape[1]
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=sequence_ids.device).tril()
    return (same & causal)[:, None]


class Collator:
    """Right-pads a batch of Encoded/PackedRow; padding gets pad_id and label -100.

    Unpacked batches get a 2D attention_mask. Packed batches get position_ids restarting per
    sample and, for `attn_implementation` "sdpa", a 4D block-diagonal causal bool mask
    ("eager": the same as an additive float mask). For other implementations (flash,
    flex) no mask is sent: transformers derives the per-sample blocks from position_ids,
    which it only does when the forward runs without a KV cache (use_cache=False).
    Padding forms a block of its own, so no real token ever attends to it.
    """

    def __init__(self, pad_id: int | None, attn_implementation: str = "sdpa") -> None:
        if pad_id is None:
            raise ValueError("the tokenizer has no pad token; call prepare_tokenizer first")
        self.pad_id = pad_id
        self.attn_implementation = attn_implementation

    def __call__(self, items: Sequence[Example]) -> dict[str, torch.Tensor]:
        rows = [_as_row(item) for item in items]
        width = max(len(row.input_ids) for row in rows)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        sequence_ids = torch.full(shape, PADDING_SEQUENCE, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        for k, row in enumerate(rows):
            size = len(row.input_ids)
            input_ids[k, :size] = torch.tensor(row.input_ids, dtype=torch.long)
            labels[k, :size] = torch.tensor(row.labels, dtype=torch.long)
            sequence_ids[k, :size] = torch.tensor(row.sequence_ids, dtype=torch.long)
            position_ids[k, :size] = torch.tensor(row.position_ids, dtype=torch.long)
            position_ids[k, size:] = torch.arange(width - size)
        labels[input_ids == self.pad_id] = IGNORE_INDEX
        batch = {"input_ids": input_ids, "labels": labels}
        if not any(isinstance(item, PackedRow) for item in items):
            batch["attention_mask"] = (sequence_ids != PADDING_SEQUENCE).long()
            return batch
        batch["position_ids"] = position_ids
        if self.attn_implementation == "sdpa":
            batch["attention_mask"] = block_causal_mask(sequence_ids)
        elif self.attn_implementation == "eager":
            allowed = block_causal_mask(sequence_ids)
            blocked = torch.zeros(allowed.shape, dtype=torch.float32)
            batch["attention_mask"] = blocked.masked_fill(~allowed, torch.finfo(torch.float32).min)
        return batch
