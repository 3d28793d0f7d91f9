"""Generation metrics on a bounded eval subset: BLEU (sacrebleu) and ROUGE-L (rouge-score)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sacrebleu
import torch
from rouge_score import rouge_scorer


def split_prompt(conversation: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """(turns before the last assistant turn, that assistant turn's text)."""
    last = max(i for i, turn in enumerate(conversation) if turn["role"] == "assistant")
    return list(conversation[:last]), conversation[last]["content"]


@torch.no_grad()
def generate_replies(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy assistant replies for each prompt (left-padded batches)."""
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    end_ids = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        end_ids.append(im_end)
    replies: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [
                tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                for p in prompts[start : start + batch_size]
            ]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(model.device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=end_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            replies += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


def generation_metrics(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[dict[str, str]]],
    max_samples: int,
    max_new_tokens: int,
) -> dict[str, float]:
    """BLEU (0-100) and mean ROUGE-L F1 (0-1) of generated vs reference assistant replies."""
    pairs = [split_prompt(c) for c in conversations[:max_samples]]
    replies = generate_replies(model, tokenizer, [p for p, _ in pairs], max_new_tokens)
    references = [r for _, r in pairs]
    bleu = sacrebleu.corpus_bleu(replies, [references]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [
        scorer.score(ref, hyp)["rougeL"].fmeasure
        for ref, hyp in zip(references, replies, strict=True)
    ]
    return {"bleu": float(bleu), "rougeL": float(sum(rouge) / max(len(rouge), 1))}
