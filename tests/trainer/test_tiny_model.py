"""The tiny-model generator: tokenizer, chat template, base model, data, determinism, cache."""

from __future__ import annotations

import hashlib
import json
import math
import re
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
from jinja2.exceptions import TemplateError
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_trainer.tiny import TinyAssets, build_tiny_assets, default_out_dir
from lora_trainer.tiny.__main__ import main
from lora_trainer.tiny.build import read_manifest
from lora_trainer.tiny.corpus import pretraining_corpus

Conversation = list[dict[str, str]]

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
QUICK_STEPS = 4  # enough to exercise the training loop; the fixture build uses the full recipe
TICKET = re.compile(
    r"Ticket (?P<order>\d{5}): [a-z ]+\. Dear (?P<name>\w+), .+\. "
    r"We will follow up within 24 hours\. Kind regards, the [\w ]+ care team\."
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    """One full default build (the recipe `make tiny-model` runs), shared by this module."""
    return build_tiny_assets(tmp_path_factory.mktemp("tiny") / "assets", seed=0)


@pytest.fixture(scope="module")
def tokenizer(assets: TinyAssets) -> Any:
    return AutoTokenizer.from_pretrained(assets.model_dir)


@pytest.fixture(scope="module")
def model(assets: TinyAssets) -> Any:
    loaded: Any = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    return loaded.eval()


@pytest.fixture(scope="module")
def eval_conversations(assets: TinyAssets) -> list[Conversation]:
    return _read_conversations(assets.eval_path)


def _read_conversations(path: Path) -> list[Conversation]:
    conversations = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        assert list(record) == ["conversations"]
        conversations.append(record["conversations"])
    return conversations


def _multi_turn(conversations: list[Conversation]) -> Conversation:
    return next(c for c in conversations if sum(m["role"] == "assistant" for m in c) > 1)


def _digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_pad_differs_from_eos_and_chatml_markers_are_single_special_tokens(tokenizer: Any) -> None:
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    start_ids = tokenizer.encode(IM_START, add_special_tokens=False)
    end_ids = tokenizer.encode(IM_END, add_special_tokens=False)
    assert len(start_ids) == 1 and len(end_ids) == 1
    named = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert len(named | {start_ids[0], end_ids[0]}) == 5
    # Inside text the markers stay whole, and decoding can drop them as special tokens.
    ids = tokenizer.encode(f"{IM_START}user\nWhere is order 12345?{IM_END}")
    assert ids[0] == start_ids[0] and ids[-1] == end_ids[0]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nWhere is order 12345?"


def test_chat_template_renders_chatml_and_round_trips(
    tokenizer: Any, eval_conversations: list[Conversation]
) -> None:
    conversation = _multi_turn(eval_conversations)
    turns = [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in conversation]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert rendered == tokenizer.bos_token + "".join(turns)
    assert tokenizer.decode(tokenizer.encode(rendered, add_special_tokens=False)) == rendered
    prompt = tokenizer.apply_chat_template(
        conversation[:-1], tokenize=False, add_generation_prompt=True
    )
    assert prompt == tokenizer.bos_token + "".join(turns[:-1]) + f"{IM_START}assistant\n"


def test_assistant_mask_covers_exactly_the_replies_and_their_end_marker(
    tokenizer: Any, eval_conversations: list[Conversation]
) -> None:
    conversation = _multi_turn(eval_conversations)
    encoded = tokenizer.apply_chat_template(
        conversation, return_dict=True, return_assistant_tokens_mask=True
    )
    supervised = [
        i for i, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m
    ]
    replies = [m["content"] + IM_END for m in conversation if m["role"] == "assistant"]
    assert tokenizer.decode(supervised) == "".join(replies)


def test_chat_template_rejects_unknown_roles(tokenizer: Any) -> None:
    with pytest.raises(TemplateError, match="unsupported role: tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)


def test_base_model_knows_the_domain_but_not_the_ticket_style(
    model: Any, tokenizer: Any, eval_conversations: list[Conversation]
) -> None:
    reply_loss, context_loss = _losses(model, tokenizer, eval_conversations)
    assert math.isfinite(reply_loss) and math.isfinite(context_loss)
    # Pre-trained: system/user turns are well predicted (an untrained model scores ~7).
    assert context_loss < 1.5
    # The fine-tuning target is new to it, so a LoRA fine-tune has something to learn.
    assert reply_loss > context_loss + 2.0


def _losses(model: Any, tokenizer: Any, conversations: list[Conversation]) -> tuple[float, float]:
    """Mean token loss on assistant tokens, and on all other tokens, over `conversations`."""
    totals = {True: 0.0, False: 0.0}
    counts = {True: 0, False: 0}
    for conversation in conversations:
        encoded = tokenizer.apply_chat_template(
            conversation, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = torch.tensor([encoded["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        token_losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        for loss, is_reply in zip(
            token_losses.tolist(), encoded["assistant_masks"][1:], strict=True
        ):
            totals[bool(is_reply)] += loss
            counts[bool(is_reply)] += 1
    return totals[True] / counts[True], totals[False] / counts[False]


def test_base_model_answers_and_stops_at_the_end_of_its_turn(
    model: Any, tokenizer: Any, eval_conversations: list[Conversation]
) -> None:
    prompt = tokenizer.apply_chat_template(
        eval_conversations[0][:-1],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=96)
    new_tokens = output[0, prompt["input_ids"].shape[1] :].tolist()
    assert new_tokens[-1] == tokenizer.convert_tokens_to_ids(IM_END)
    assert len(tokenizer.decode(new_tokens, skip_special_tokens=True).split()) >= 5


def test_fine_tuning_data_is_conversations_jsonl(assets: TinyAssets) -> None:
    manifest = read_manifest(assets.manifest_path.parent)
    assert manifest is not None
    splits = {"train": assets.train_path, "eval": assets.eval_path}
    data = {name: _read_conversations(path) for name, path in splits.items()}
    for name, conversations in data.items():
        assert len(conversations) == manifest["data"][name]["samples"]
        assert any(len(c) > 3 for c in conversations), f"{name} has no multi-turn samples"
        for conversation in conversations:
            roles = [m["role"] for m in conversation]
            turns = roles[1:] if roles[0] == "system" else roles
            assert turns == ["user", "assistant"] * (len(turns) // 2) and turns
            assert all(isinstance(m["content"], str) and m["content"] for m in conversation)
    assert 400 <= len(data["train"]) <= 1000 and len(data["eval"]) == 64
    user_turns = [{str([m for m in c if m["role"] == "user"]) for c in d} for d in data.values()]
    assert not user_turns[0] & user_turns[1], "eval conversations leak into train"


def test_ticket_replies_follow_one_pattern_the_base_corpus_never_shows(
    assets: TinyAssets,
) -> None:
    for conversation in _read_conversations(assets.train_path):
        for previous, message in pairwise(conversation):
            if message["role"] == "assistant":
                match = TICKET.fullmatch(message["content"])
                assert match, message["content"]
                assert match["order"] in previous["content"]  # readable from the request
    casual_replies = [
        m["content"] for c in pretraining_corpus(seed=0) for m in c if m["role"] == "assistant"
    ]
    assert not [r for r in casual_replies if r.startswith("Ticket") or "care team." in r]


def test_same_seed_gives_byte_identical_builds_and_the_seed_matters(tmp_path: Path) -> None:
    first = _digests(_quick_build(tmp_path / "a", seed=3).model_dir.parent)
    second = _digests(_quick_build(tmp_path / "b", seed=3).model_dir.parent)
    other = _digests(_quick_build(tmp_path / "c", seed=4).model_dir.parent)
    assert {"model/model.safetensors", "model/tokenizer.json", "data/train.jsonl"} <= set(first)
    assert first == second
    for name in ("model/model.safetensors", "data/train.jsonl", "data/eval.jsonl"):
        assert other[name] != first[name]


def _quick_build(out_dir: Path, seed: int, force: bool = False) -> TinyAssets:
    return build_tiny_assets(out_dir, seed=seed, force=force, pretrain_steps=QUICK_STEPS)


def test_complete_build_is_reused_and_force_or_damage_rebuilds(tmp_path: Path) -> None:
    built = _quick_build(tmp_path, seed=0)
    weights = built.model_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert not built.reused

    cached = _quick_build(tmp_path, seed=0)
    assert cached.reused and weights.stat().st_mtime_ns == stamp

    digests = _digests(tmp_path)
    forced = _quick_build(tmp_path, seed=0, force=True)
    assert not forced.reused and _digests(tmp_path) == digests

    built.eval_path.write_text("{}\n", encoding="utf-8")  # a damaged or half-written build
    repaired = _quick_build(tmp_path, seed=0)
    assert not repaired.reused and len(_read_conversations(repaired.eval_path)) == 64


def test_cli_reports_a_cached_build(assets: TinyAssets, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(assets.model_dir.parent), "--seed", "0"]) == 0
    assert "cached" in capsys.readouterr().out


def test_default_out_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_OPERATOR_TINY_DIR", "/srv/tiny")
    assert default_out_dir() == Path("/srv/tiny")
    monkeypatch.delenv("LORA_OPERATOR_TINY_DIR")
    assert default_out_dir() == Path("/tmp/lora-operator/tiny")
