"""Token statistics of the encoded training data (the field report's data checks)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_trainer.data import Encoded

IGNORE_INDEX = -100
TOP_TOKENS = 10


@dataclass
class DataStats:
    """What the model will be trained on; fractions are 0.0 when their denominator is 0."""

    samples: int
    malformed: int
    tokens: int
    supervised_tokens: int
    supervised_fraction: float
    samples_without_supervision: int
    truncated_samples: int
    truncation_rate: float
    samples_with_dropped_turns: int
    special_token_ratio: float
    pad_label_fraction: float
    eos_label_fraction: float
    mean_length: float
    max_length: int
    top_label_tokens: list[tuple[str, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping (top tokens as {token, count} objects)."""
        out = asdict(self)
        out["top_label_tokens"] = [{"token": t, "count": n} for t, n in self.top_label_tokens]
        return out


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def compute_stats(encoded: Sequence[Encoded], tokenizer: Any, n_malformed: int) -> DataStats:
    """Counts and fractions over `encoded`; label fractions are over supervised labels."""
    supervised: Counter[int] = Counter()
    without = 0
    for sample in encoded:
        labels = [label for label in sample.labels if label != IGNORE_INDEX]
        supervised.update(labels)
        without += not labels
    n_supervised = sum(supervised.values())
    tokens = sum(len(sample.input_ids) for sample in encoded)
    special = set(tokenizer.all_special_ids)
    truncated = sum(1 for sample in encoded if sample.truncated)

    def label_fraction(ids: set[int]) -> float:
        return _ratio(sum(supervised[i] for i in ids), n_supervised)

    return DataStats(
        samples=len(encoded),
        malformed=n_malformed,
        tokens=tokens,
        supervised_tokens=n_supervised,
        supervised_fraction=_ratio(n_supervised, tokens),
        samples_without_supervision=without,
        truncated_samples=truncated,
        truncation_rate=_ratio(truncated, len(encoded)),
        samples_with_dropped_turns=sum(1 for sample in encoded if sample.dropped_turns),
        special_token_ratio=label_fraction(special),
        pad_label_fraction=label_fraction({tokenizer.pad_token_id} - {None}),
        eos_label_fraction=label_fraction({tokenizer.eos_token_id} - {None}),
        mean_length=_ratio(tokens, len(encoded)),
        max_length=max((len(sample.input_ids) for sample in encoded), default=0),
        top_label_tokens=[
            (tokenizer.decode([token]), count)
            for token, count in supervised.most_common(TOP_TOKENS)
        ],
    )
