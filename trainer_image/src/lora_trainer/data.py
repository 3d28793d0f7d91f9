"""Training data: JSONL conversations -> chat-templated token ids with assistant-only labels.

What this module guarantees (the field report's preprocessing bugs cannot happen here):
- pad is a token of its own, never eos, and padding never carries a label;
- every assistant turn is supervised up to and including its end-of-turn token
  (`<|im_end|>` / eos), so the model learns to stop; prompts and headers carry -100;
- ChatML markers are real special tokens (one id each), never split into pieces.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_operator.api.spec import DatasetSpec
from lora_trainer.data_stats import DataStats, compute_stats
from lora_trainer.packing import Collator, Example, PackedRow, pack

__all__ = [
    "IGNORE_INDEX",
    "CHATML_TEMPLATE",
    "Collator",
    "Conversation",
    "DataError",
    "DataStats",
    "Encoded",
    "Example",
    "PackedRow",
    "PreparedData",
    "ReadResult",
    "check_stats",
    "compute_stats",
    "encode_conversation",
    "load_dataset",
    "pack",
    "prepare_tokenizer",
    "read_conversations",
]

IGNORE_INDEX = -100
ROLES = frozenset({"system", "user", "assistant"})
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
MAX_REPORTED_PROBLEMS = 5
EVAL_SPLIT_SEED = 1234
# ChatML; `{% generation %}` marks the supervised part (transformers' assistant mask agrees).
CHATML_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

Conversation = list[dict[str, str]]


class DataError(ValueError):
    """The training data cannot be used; the message says which file/sample and why."""


@dataclass
class ReadResult:
    """Valid conversations of a JSONL file, and what was skipped."""

    path: Path
    conversations: list[Conversation]
    n_malformed: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class Encoded:
    """One tokenized conversation; labels are -100 except on assistant tokens."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    dropped_turns: int = 0


@dataclass
class PreparedData:
    """What the trainer consumes: train/eval examples, raw eval conversations, train stats."""

    train: list[Example]
    eval: list[Example]
    eval_conversations: list[Conversation]
    stats: DataStats
    eval_stats: DataStats | None
    vocab_size: int
    problems: list[str] = field(default_factory=list)


# --- reading -----------------------------------------------------------------------------


def _check_record(record: Any) -> tuple[Conversation | None, str]:
    """(conversation, "") when valid, else (None, reason)."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        return None, "no 'conversations' list"
    if not turns:
        return None, "empty conversations"
    conversation: Conversation = []
    for index, turn in enumerate(turns):
        role = turn.get("role") if isinstance(turn, dict) else None
        if role not in ROLES:
            return None, f"turn {index}: unknown role {role!r}"
        content = turn.get("content")
        if not isinstance(content, str):
            return None, f"turn {index}: content is not a string"
        conversation.append({"role": str(role), "content": content})
    if not any(turn["role"] == "assistant" for turn in conversation):
        return None, "no assistant turn"
    return conversation, ""


def read_conversations(path: Path) -> ReadResult:
    """Valid conversations of a JSONL file; malformed lines are skipped and reported."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read data file {path}: {err}") from err
    result = ReadResult(path=path, conversations=[])
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            conversation, reason = _check_record(json.loads(line))
        except json.JSONDecodeError as err:
            conversation, reason = None, f"not JSON ({err.msg})"
        if conversation is not None:
            result.conversations.append(conversation)
            continue
        result.n_malformed += 1
        if len(result.problems) < MAX_REPORTED_PROBLEMS:
            result.problems.append(f"{path}:{number}: {reason}")
    if not result.conversations:
        detail = "; ".join(result.problems) or "the file is empty"
        raise DataError(f"data file {path} has no usable conversation: {detail}")
    return result


# --- tokenizer ---------------------------------------------------------------------------


def prepare_tokenizer(tokenizer: Any, chat_template: str) -> bool:
    """Give the tokenizer a pad distinct from eos and a chat template; True if vocab grew."""
    before = len(tokenizer)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if chat_template == "chatml":
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [IM_START, IM_END]}, replace_extra_special_tokens=False
        )
        tokenizer.chat_template = CHATML_TEMPLATE
    elif chat_template == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "the tokenizer has no chat template; set spec.dataset.chatTemplate: chatml "
                "to use ChatML (<|im_start|>/<|im_end|> added as special tokens)"
            )
    else:
        raise DataError(f"unknown chat template {chat_template!r} (use tokenizer or chatml)")
    return len(tokenizer) != before


# --- encoding ----------------------------------------------------------------------------


def _render(tokenizer: Any, messages: Conversation, generation_prompt: bool = False) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja raises TemplateError and arbitrary user exceptions
        raise DataError(f"the chat template failed on a conversation: {err}") from err
    return str(text)


def _assistant_spans(
    tokenizer: Any, messages: Conversation
) -> tuple[str, list[tuple[int, int]], list[int]]:
    """(rendered text, char span of each assistant reply + end-of-turn, char end of each turn).

    Each assistant turn is located by rendering the conversation up to it (with the
    generation prompt) and through it; both must be prefixes of the full rendering.
    """
    full = _render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    turn_ends: list[int] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:index], generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1])
        if not (through.startswith(head) and full.startswith(through)):
            raise DataError(
                "the tokenizer's chat template does not render conversations turn by turn "
                "(a prefix renders differently), so assistant turns cannot be located; "
                "set spec.dataset.chatTemplate: chatml"
            )
        # Trailing whitespace after the end-of-turn marker is layout, not something to learn.
        spans.append((len(head), len(head) + len(through[len(head) :].rstrip())))
        turn_ends.append(len(through))
    return full, spans, turn_ends


def _fit(
    ids: list[int], labels: list[int], starts: list[int], turn_ends: list[int], max_length: int
) -> Encoded:
    """Keep whole turns: drop trailing exchanges; cut tokens only if the first is too long."""
    if len(ids) <= max_length:
        return Encoded(ids, labels)
    for kept in range(len(turn_ends) - 1, -1, -1):
        count = sum(1 for start in starts if start < turn_ends[kept])
        if count <= max_length:
            dropped = len(turn_ends) - 1 - kept
            return Encoded(ids[:count], labels[:count], dropped_turns=dropped)
    return Encoded(
        ids[:max_length], labels[:max_length], truncated=True, dropped_turns=len(turn_ends) - 1
    )


def encode_conversation(tokenizer: Any, conversation: Conversation, max_length: int) -> Encoded:
    """Chat-templated ids; labels on assistant replies incl. their end-of-turn token."""
    last = max(i for i, turn in enumerate(conversation) if turn["role"] == "assistant")
    messages = list(conversation[: last + 1])  # a trailing prompt has nothing to learn
    text, spans, turn_ends = _assistant_spans(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(token) for token in encoding["input_ids"]]
    starts = [int(start) for start, _ in encoding["offset_mapping"]]
    labels = [
        token if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for token, start in zip(ids, starts, strict=True)
    ]
    return _fit(ids, labels, starts, turn_ends, max_length)


# --- stats gate and loading --------------------------------------------------------------


def check_stats(stats: DataStats) -> None:
    """Refuse data on which training cannot learn anything."""
    if stats.supervised_tokens == 0:
        raise DataError(
            f"no sample has a supervised token (all {stats.samples} samples have labels -100 "
            "everywhere): check that the conversations have assistant turns and that "
            "maxLength leaves room for them"
        )


def _encode_all(
    tokenizer: Any, conversations: Sequence[Conversation], max_length: int, where: str
) -> tuple[list[Encoded], list[str]]:
    """Encoded conversations and the problems of those the template could not render."""
    encoded: list[Encoded] = []
    problems: list[str] = []
    for index, conversation in enumerate(conversations):
        try:
            encoded.append(encode_conversation(tokenizer, conversation, max_length))
        except DataError as err:
            problems.append(f"{where} sample {index}: {err}")
    if not encoded:
        raise DataError(f"no sample of {where} could be encoded: {'; '.join(problems[:3])}")
    return encoded, problems


def _split(
    conversations: list[Conversation], fraction: float
) -> tuple[list[Conversation], list[Conversation]]:
    """Deterministic (train, eval) holdout; both sides keep at least one conversation."""
    if len(conversations) < 2:
        raise DataError("evalSplit needs at least 2 conversations in the training file")
    count = min(max(1, round(len(conversations) * fraction)), len(conversations) - 1)
    held = set(random.Random(EVAL_SPLIT_SEED).sample(range(len(conversations)), count))
    train = [c for i, c in enumerate(conversations) if i not in held]
    return train, [c for i, c in enumerate(conversations) if i in held]


def _examples(encoded: list[Encoded], spec: DatasetSpec) -> list[Example]:
    """Samples that supervise something, packed if the spec asks."""
    useful = [e for e in encoded if any(label != IGNORE_INDEX for label in e.labels)]
    if spec.packing:
        return list(pack(useful, spec.max_length))
    return list(useful)


def load_dataset(spec: DatasetSpec, tokenizer: Any, resolve: Callable[[str], Path]) -> PreparedData:
    """Read, split, encode (and pack) the data of `spec`; stats describe the train set."""
    prepare_tokenizer(tokenizer, spec.chat_template)  # idempotent
    train_read = read_conversations(resolve(spec.source))
    train_convs, eval_convs = train_read.conversations, []
    problems = list(train_read.problems)
    n_malformed = train_read.n_malformed
    if spec.eval_source is not None:
        eval_read = read_conversations(resolve(spec.eval_source))
        eval_convs, problems = eval_read.conversations, problems + eval_read.problems
    elif spec.eval_split is not None:
        train_convs, eval_convs = _split(train_convs, spec.eval_split)
    train_enc, bad = _encode_all(tokenizer, train_convs, spec.max_length, str(spec.source))
    stats = compute_stats(train_enc, tokenizer, n_malformed + len(bad))
    eval_enc: list[Encoded] = []
    if eval_convs:
        eval_enc, eval_bad = _encode_all(tokenizer, eval_convs, spec.max_length, "eval data")
        bad += eval_bad
    return PreparedData(
        train=_examples(train_enc, spec),
        eval=_examples(eval_enc, spec),
        eval_conversations=eval_convs,
        stats=stats,
        eval_stats=compute_stats(eval_enc, tokenizer, 0) if eval_enc else None,
        vocab_size=len(tokenizer),
        problems=problems + bad[:MAX_REPORTED_PROBLEMS],
    )
