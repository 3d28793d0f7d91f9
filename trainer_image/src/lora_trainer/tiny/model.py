"""A small Llama, randomly initialised from its config and pre-trained on packed chat text."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from .tokenizer import IM_END, MODEL_MAX_LENGTH


@dataclass(frozen=True)
class PretrainSettings:
    """Pre-training recipe. Defaults fit the <= 60 s budget on 2 CPU cores."""

    steps: int = 300
    batch_size: int = 8
    block_size: int = 256
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0


def build_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The tiny Llama architecture, sized to the tokenizer."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Greedy decoding that stops at the end of the assistant turn (or at eos)."""
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[im_end_id, tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=128,
    )


def pack_blocks(documents: Sequence[Sequence[int]], block_size: int) -> torch.Tensor:
    """Concatenate token documents and cut them into full blocks (the remainder is dropped)."""
    stream = [token for document in documents for token in document]
    count = len(stream) // block_size
    if count == 0:
        raise ValueError(f"corpus of {len(stream)} tokens is shorter than one block")
    return torch.tensor(stream[: count * block_size], dtype=torch.long).view(count, block_size)


def _batches(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless mini-batches; each epoch is a fresh seeded permutation of the blocks."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(blocks.shape[0], generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield blocks[order[start : start + batch_size]]


def _lr_factor(step: int, settings: PretrainSettings) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio`."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return settings.min_lr_ratio + (1.0 - settings.min_lr_ratio) * cosine


def pretrain(
    model: LlamaForCausalLM, blocks: torch.Tensor, settings: PretrainSettings, seed: int
) -> list[float]:
    """Train every weight with AdamW on the packed blocks; returns the loss of each step."""
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=settings.learning_rate,
        betas=(0.9, 0.95),
        weight_decay=settings.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, settings)
    )
    batches = _batches(blocks, settings.batch_size, seed)
    losses: list[float] = []
    model.train()
    for _ in range(settings.steps):
        batch = next(batches)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def create_model(tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama; the initial weights depend only on `seed`."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(build_config(tokenizer))
    model.generation_config = build_generation_config(tokenizer)
    return model
