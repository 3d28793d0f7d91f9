"""Data handling: assistant-only labels incl. end-of-turn, pad != eos, ChatML special tokens,
whole-turn truncation, malformed input, packing isolation, collation and statistics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from lora_operator.api.spec import DatasetSpec
from lora_trainer.data import (
    Collator,
    Conversation,
    DataError,
    Encoded,
    PackedRow,
    check_stats,
    compute_stats,
    encode_conversation,
    load_dataset,
    pack,
    prepare_tokenizer,
    read_conversations,
)
from lora_trainer.tiny import TinyAssets

IGNORE = -100
SINGLE: Conversation = [
    {"role": "system", "content": "You are a helpful shop assistant."},
    {"role": "user", "content": "Where is my parcel 123?"},
    {"role": "assistant", "content": "Ticket 123 | Parcel\nIt left the depot today."},
]
MULTI: Conversation = [
    *SINGLE,
    {"role": "user", "content": "Thanks! And the invoice?"},
    {"role": "assistant", "content": "The invoice was sent by email."},
]
# Ends each assistant turn with the tokenizer's real eos (Llama-2/Mistral style).
EOS_TEMPLATE = (
    "{% for m in messages %}{{ '[' + m['role'] + '] ' }}"
    "{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
    "{% else %}{{ m['content'] }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
)


def plain_tokenizer(pad_is_eos: bool = True, template: str | None = None) -> Any:
    """A byte-level BPE tokenizer with only </s>: no ChatML markers, pad = eos (or none)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [turn["content"] for turn in MULTI] * 5
    backend.train_from_iterator(texts, trainer=trainer)
    factory: Any = PreTrainedTokenizerFast
    return factory(
        tokenizer_object=backend,
        eos_token="</s>",
        pad_token="</s>" if pad_is_eos else None,
        chat_template=template,
    )


def labelled_spans(tokenizer: Any, encoded: Encoded) -> list[str]:
    """Decoded runs of consecutive supervised tokens."""
    spans: list[list[int]] = []
    previous = IGNORE
    for label in encoded.labels:
        if label != IGNORE:
            if previous == IGNORE:
                spans.append([])
            spans[-1].append(label)
        previous = label
    return [tokenizer.decode(span, skip_special_tokens=False) for span in spans]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def record(conversation: list[dict[str, Any]]) -> str:
    return json.dumps({"conversations": conversation})


# --- labels ------------------------------------------------------------------------------


@pytest.mark.parametrize("conversation", [SINGLE, MULTI], ids=["single", "multi-turn"])
def test_only_assistant_replies_and_their_end_of_turn_are_supervised(
    tiny_tokenizer: Any, conversation: Conversation
) -> None:
    encoded = encode_conversation(tiny_tokenizer, conversation, 512)
    replies = [t["content"] + "<|im_end|>" for t in conversation if t["role"] == "assistant"]
    assert labelled_spans(tiny_tokenizer, encoded) == replies
    assert all(
        lab in (IGNORE, tok) for tok, lab in zip(encoded.input_ids, encoded.labels, strict=True)
    )
    assert not encoded.truncated and encoded.dropped_turns == 0
    # everything else (bos, system, user, the assistant header) carries -100
    prompt = [t for t, lab in zip(encoded.input_ids, encoded.labels, strict=True) if lab == IGNORE]
    assert "Where is my parcel" in tiny_tokenizer.decode(prompt)
    assert tiny_tokenizer.decode(prompt).count("<|im_start|>assistant\n") == len(replies)


def test_labels_agree_with_the_templates_generation_mask(
    tiny_tokenizer: Any, tiny_assets: TinyAssets
) -> None:
    """On the whole tiny train set, labels equal transformers' {% generation %} mask."""
    for conversation in read_conversations(tiny_assets.train_path).conversations:
        encoded = encode_conversation(tiny_tokenizer, conversation, 4096)
        ref = tiny_tokenizer.apply_chat_template(
            conversation, return_dict=True, return_assistant_tokens_mask=True
        )
        assert encoded.input_ids == list(ref["input_ids"])
        assert [lab != IGNORE for lab in encoded.labels] == [
            bool(m) for m in ref["assistant_masks"]
        ]


def test_pad_is_distinct_from_eos_and_real_eos_stays_supervised() -> None:
    tokenizer = plain_tokenizer(pad_is_eos=True, template=EOS_TEMPLATE)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert prepare_tokenizer(tokenizer, "tokenizer") is True
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    short = encode_conversation(tokenizer, SINGLE, 512)
    long = encode_conversation(tokenizer, MULTI, 512)
    assert labelled_spans(tokenizer, short) == [SINGLE[2]["content"] + "</s>"]
    batch = Collator(tokenizer.pad_token_id)([short, long])
    eos = tokenizer.eos_token_id
    assert int((batch["labels"][0] == eos).sum()) == 1  # the real eos survives collation
    assert int((batch["labels"][1] == eos).sum()) == 2
    padding = batch["attention_mask"] == 0
    assert padding[0].any() and (batch["input_ids"][padding] == tokenizer.pad_token_id).all()
    assert (batch["labels"][padding] == IGNORE).all()


def test_chatml_adds_markers_as_single_special_tokens() -> None:
    tokenizer = plain_tokenizer(pad_is_eos=False)
    assert len(tokenizer.tokenize("<|im_start|>")) > 1  # split into pieces before
    assert prepare_tokenizer(tokenizer, "chatml") is True
    assert prepare_tokenizer(tokenizer, "chatml") is False  # idempotent
    pieces = tokenizer.tokenize("<|im_start|>user<|im_end|>")
    assert pieces[0] == "<|im_start|>" and pieces[-1] == "<|im_end|>"
    assert "".join(pieces[1:-1]) == "user"
    assert {"<|im_start|>", "<|im_end|>", "<|pad|>"} <= set(tokenizer.all_special_tokens)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    encoded = encode_conversation(tokenizer, MULTI, 512)
    assert labelled_spans(tokenizer, encoded) == [
        MULTI[2]["content"] + "<|im_end|>",
        MULTI[4]["content"] + "<|im_end|>",
    ]


def test_tokenizer_mode_without_a_template_suggests_chatml() -> None:
    with pytest.raises(DataError, match="chatTemplate: chatml"):
        prepare_tokenizer(plain_tokenizer(), "tokenizer")


# --- truncation --------------------------------------------------------------------------


def test_truncation_keeps_whole_turns(tiny_tokenizer: Any) -> None:
    full = encode_conversation(tiny_tokenizer, MULTI, 4096)
    first = encode_conversation(tiny_tokenizer, SINGLE, 4096)
    fits_first = encode_conversation(tiny_tokenizer, MULTI, len(full.input_ids) - 1)
    assert fits_first == Encoded(first.input_ids, first.labels, truncated=False, dropped_turns=1)
    assert encode_conversation(tiny_tokenizer, MULTI, len(full.input_ids)) == full
    cut = encode_conversation(tiny_tokenizer, MULTI, len(first.input_ids) - 3)
    assert cut.truncated and cut.dropped_turns == 1
    assert cut.input_ids == first.input_ids[:-3] and cut.labels == first.labels[:-3]


# --- reading -----------------------------------------------------------------------------


def test_malformed_lines_are_skipped_counted_and_located(tmp_path: Path) -> None:
    lines = [
        record(SINGLE),
        "{not json",
        json.dumps({"messages": SINGLE}),
        json.dumps({"conversations": []}),
        record([{"role": "tool", "content": "x"}, SINGLE[2]]),
        record([SINGLE[1], {"role": "assistant", "content": 3}]),
        "",
        record(SINGLE[:2]),
        record(MULTI),
    ]
    result = read_conversations(write_jsonl(tmp_path / "d.jsonl", lines))
    assert result.conversations == [SINGLE, MULTI]
    assert result.n_malformed == 6
    assert result.problems == [
        f"{tmp_path / 'd.jsonl'}:2: not JSON (Expecting property name enclosed in double quotes)",
        f"{tmp_path / 'd.jsonl'}:3: no 'conversations' list",
        f"{tmp_path / 'd.jsonl'}:4: empty conversations",
        f"{tmp_path / 'd.jsonl'}:5: turn 0: unknown role 'tool'",
        f"{tmp_path / 'd.jsonl'}:6: turn 1: content is not a string",
    ]


def test_all_malformed_and_missing_files_name_the_file(tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", ["[]", record(SINGLE[:2])])
    with pytest.raises(DataError, match=r"bad\.jsonl has no usable.*:1: no 'conversations'"):
        read_conversations(bad)
    with pytest.raises(DataError, match=r"cannot read data file .*missing\.jsonl"):
        read_conversations(tmp_path / "missing.jsonl")


# --- stats -------------------------------------------------------------------------------


def test_stats_on_a_known_input(tiny_tokenizer: Any) -> None:
    eos, pad, im_end = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id, 4
    a, b = 100, 200
    encoded = [
        Encoded([1, 2, a, a, im_end], [IGNORE, IGNORE, a, a, im_end]),
        Encoded([1, 2, b, eos], [IGNORE, IGNORE, b, eos], truncated=True),
        Encoded([1, 2, 3], [IGNORE] * 3, dropped_turns=1),
    ]
    stats = compute_stats(encoded, tiny_tokenizer, n_malformed=2)
    assert stats.to_dict() == {
        "samples": 3,
        "malformed": 2,
        "tokens": 12,
        "supervised_tokens": 5,
        "supervised_fraction": 5 / 12,
        "samples_without_supervision": 1,
        "truncated_samples": 1,
        "truncation_rate": 1 / 3,
        "samples_with_dropped_turns": 1,
        "special_token_ratio": 2 / 5,
        "pad_label_fraction": 0.0,
        "eos_label_fraction": 1 / 5,
        "mean_length": 4.0,
        "max_length": 5,
        "top_label_tokens": [
            {"token": tiny_tokenizer.decode([a]), "count": 2},
            {"token": "<|im_end|>", "count": 1},
            {"token": tiny_tokenizer.decode([b]), "count": 1},
            {"token": "<|end_of_text|>", "count": 1},
        ],
    }
    assert pad not in (a, b)
    check_stats(stats)


def test_data_without_any_supervised_token_is_refused(
    tiny_tokenizer: Any, tiny_assets: TinyAssets
) -> None:
    spec = DatasetSpec(source=f"file://{tiny_assets.eval_path}", max_length=16)
    data = load_dataset(spec, tiny_tokenizer, lambda uri: Path(uri.removeprefix("file://")))
    assert data.stats.supervised_tokens == 0 and data.stats.truncation_rate == 1.0
    with pytest.raises(DataError, match="no sample has a supervised token"):
        check_stats(data.stats)


# --- loading -----------------------------------------------------------------------------


def _resolve(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def test_load_dataset_eval_source_split_and_packing(
    tiny_tokenizer: Any, tiny_assets: TinyAssets
) -> None:
    train, evaluation = f"file://{tiny_assets.train_path}", f"file://{tiny_assets.eval_path}"
    plain = load_dataset(DatasetSpec(source=train, max_length=256), tiny_tokenizer, _resolve)
    assert len(plain.train) == plain.stats.samples == 640 and plain.eval == []
    assert plain.vocab_size == len(tiny_tokenizer)
    with_eval = DatasetSpec(source=train, eval_source=evaluation, max_length=256)
    data = load_dataset(with_eval, tiny_tokenizer, _resolve)
    assert len(data.eval) == len(data.eval_conversations) == 64 and data.eval_stats is not None
    split = DatasetSpec(source=train, eval_split=0.1, max_length=256)
    one = load_dataset(split, tiny_tokenizer, _resolve)
    two = load_dataset(split, tiny_tokenizer, _resolve)
    assert len(one.eval) == 64 and len(one.train) == 576
    assert one.eval_conversations == two.eval_conversations  # deterministic holdout
    packed = load_dataset(
        DatasetSpec(source=train, max_length=256, packing=True), tiny_tokenizer, _resolve
    )
    assert all(isinstance(row, PackedRow) for row in packed.train)
    assert len(packed.train) < 640 and all(len(r.input_ids) <= 256 for r in packed.train)
    samples = sum(max(r.sequence_ids) + 1 for r in packed.train if isinstance(r, PackedRow))
    assert samples == 640


# --- packing -----------------------------------------------------------------------------


def test_pack_restarts_positions_and_masks_cross_sample_labels(tiny_tokenizer: Any) -> None:
    encoded = [encode_conversation(tiny_tokenizer, c, 512) for c in (SINGLE, MULTI, SINGLE)]
    rows = pack(encoded, len(encoded[1].input_ids) + len(encoded[0].input_ids))
    assert len(rows) == 2
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert starts == [
            i for i, s in enumerate(row.sequence_ids) if i == 0 or s != row.sequence_ids[i - 1]
        ]
        assert all(row.labels[i] == IGNORE for i in starts)
    assert sorted(len(r.input_ids) for r in rows) == sorted(
        [len(encoded[0].input_ids), len(encoded[0].input_ids) + len(encoded[1].input_ids)]
    )


@pytest.fixture(scope="module")
def tiny_models(tiny_assets: TinyAssets) -> dict[str, Any]:
    out = {}
    for impl in ("sdpa", "eager"):
        model: Any = AutoModelForCausalLM.from_pretrained(
            tiny_assets.model_dir, dtype=torch.float32, attn_implementation=impl
        )
        out[impl] = model.eval()
    return out


@pytest.mark.parametrize(
    ("model_impl", "collator_impl"),
    [("sdpa", "sdpa"), ("eager", "eager"), ("sdpa", "flash_attention_2")],
    ids=["sdpa-4d-bool", "eager-4d-float", "position-ids-only"],
)
def test_packed_samples_cannot_see_each_other(
    tiny_tokenizer: Any,
    tiny_assets: TinyAssets,
    tiny_models: dict[str, Any],
    model_impl: str,
    collator_impl: str,
) -> None:
    """Logits of each sample inside a packed (and padded) batch equal its logits alone."""
    model = tiny_models[model_impl]
    conversations = read_conversations(tiny_assets.eval_path).conversations[:5]
    encoded = [encode_conversation(tiny_tokenizer, c, 512) for c in conversations]
    rows = pack(encoded, 400)
    assert len(rows) >= 2 and max(max(r.sequence_ids) for r in rows) >= 2
    batch = Collator(tiny_tokenizer.pad_token_id, collator_impl)(rows)
    assert ("attention_mask" in batch) == (collator_impl != "flash_attention_2")
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        # use_cache=False as in training: with a cache, transformers skips packing detection
        packed_logits = model(**inputs, use_cache=False).logits
        for k, row in enumerate(rows):
            for seq in set(row.sequence_ids):
                where = [i for i, s in enumerate(row.sequence_ids) if s == seq]
                ids = torch.tensor([[row.input_ids[i] for i in where]])
                alone = model(input_ids=ids).logits[0]
                torch.testing.assert_close(packed_logits[k, where], alone, atol=1e-4, rtol=0)


def test_collator_pads_right_without_loss_on_padding(tiny_tokenizer: Any) -> None:
    short = encode_conversation(tiny_tokenizer, SINGLE, 512)
    long = encode_conversation(tiny_tokenizer, MULTI, 512)
    batch = Collator(tiny_tokenizer.pad_token_id)([short, long])
    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    assert batch["input_ids"][0, :n].tolist() == short.input_ids
    assert batch["labels"][0, :n].tolist() == short.labels
    assert (batch["input_ids"][0, n:] == tiny_tokenizer.pad_token_id).all()
    assert (batch["labels"][0, n:] == IGNORE).all()
    assert batch["attention_mask"].tolist()[0] == [1] * n + [0] * (len(long.input_ids) - n)
    assert batch["attention_mask"][1].all() and "position_ids" not in batch
    assert not (batch["labels"] == tiny_tokenizer.pad_token_id).any()
