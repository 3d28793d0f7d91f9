"""spec.performance on a GPU (marker gpu: run on the device machine, see docs/performance.md):
Liger's kernels train to the plain path's losses within bf16 tolerance, and checkpointing:
auto measures and plans within its budget."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lora_operator.api.spec import LoRAFineTuneSpec
from lora_trainer.model import apply_lora
from lora_trainer.speed import (
    apply_performance,
    decoder_layers,
    measure_layers,
    plan_checkpointing,
)

# skipif, not a module-level skip: deselected (-m "not gpu") it never runs, never "skips"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def spec(performance: dict[str, Any], gc: bool = False, seq: int = 256) -> LoRAFineTuneSpec:
    return LoRAFineTuneSpec.model_validate(
        {
            "model": {"source": "file:///unused", "dtype": "bfloat16"},
            "dataset": {"source": "file:///unused", "maxLength": seq},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]},
            "training": {
                "maxSteps": 10,
                "microBatchSize": 8,
                "precision": "bf16",
                "gradientCheckpointing": gc,
            },
            "performance": performance,
            "output": {"uri": "file:///tmp/unused"},
        }
    )


def model_for(s: LoRAFineTuneSpec, layers: int = 4) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=4096,
        max_position_embeddings=1024,
    )
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return apply_lora(base, s.lora, s.training.gradient_checkpointing)


def train_losses(s: LoRAFineTuneSpec, steps: int = 10) -> tuple[list[float], Any]:
    model = model_for(s)
    plan = apply_performance(model, s)
    model.cuda().train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 4096, (8, 256), generator=g).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, plan


def test_liger_kernels_train_to_the_plain_losses() -> None:
    # plain first: Liger patches transformers' Llama module process-wide
    plain, plan_plain = train_losses(spec({"fusedKernels": "none"}))
    fused, plan_fused = train_losses(spec({"fusedKernels": "liger"}))
    assert not plan_plain.fused_kernels and plan_fused.fused_kernels
    assert plain[-1] < plain[0]  # it learns (lr 1e-3 on random tokens memorised)
    for a, b in zip(plain, fused, strict=True):
        assert abs(a - b) <= 2e-2 * abs(a), (plain, fused)


def test_auto_checkpointing_plans_within_its_budget() -> None:
    s = spec({"checkpointing": "auto"}, gc=True, seq=1024)
    model = model_for(s).cuda()
    peak_all, per_layer = measure_layers(model, 8, 1024, torch.bfloat16)
    assert per_layer > 0 and peak_all > 0
    # a GPU with room for two and a half kept layers: the other two are checkpointed
    total = int((peak_all + 2.5 * per_layer) / s.performance.memory_fraction)
    count, note = plan_checkpointing(model, s, torch.bfloat16, total_memory=total)
    assert count == 2, note
    assert plan_checkpointing(model, s, torch.bfloat16, total_memory=10 * total)[0] == 0
    assert plan_checkpointing(model, s, torch.bfloat16, total_memory=total // 2)[0] == 4
    plan = apply_performance(model, s)  # the real GPU: a small model needs no checkpointing
    assert plan.checkpointed_layers == 0, plan
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))
