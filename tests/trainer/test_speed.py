"""spec.performance keeps the plain path's numerics (tiny Llama on CPU; Liger: test_speed_gpu)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from lora_operator.api.spec import LoRAFineTuneSpec
from lora_trainer.config import SpecError
from lora_trainer.speed import (
    apply_performance,
    checkpoint_last,
    decoder_layers,
    enable_adapter_fast_path,
    kernels_decision,
    layers_to_checkpoint,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny(dropout: float = 0.0, gc: bool = False, layers: int = 3) -> Any:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
    )
    base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if gc:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    # init_lora_weights=False: B is random too, so both A and B get gradients at step 1
    cfg_lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False
    )
    model = get_peft_model(base, cfg_lora)
    model.train()
    return model


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def loss_and_grads(model: Any, autocast: bool = True, seed: int = 3) -> tuple[Any, dict[str, Any]]:
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch()).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def lora_input_dtypes(model: Any) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_pre_hook(lambda m, args: seen.add(args[0].dtype))
    return seen


def test_adapter_fast_path_is_exact_and_drops_the_fp32_copy() -> None:
    plain, fast = tiny(), tiny()
    assert enable_adapter_fast_path(fast) == 3 * len(TARGETS)
    seen_plain, seen_fast = lora_input_dtypes(plain), lora_input_dtypes(fast)
    loss_p, grads_p = loss_and_grads(plain)
    loss_f, grads_f = loss_and_grads(fast)
    assert seen_plain == {torch.float32}  # peft's copy of every activation, in fp32
    assert seen_fast == {torch.bfloat16}  # no copy: autocast feeds the matmul in bf16 anyway
    assert torch.equal(loss_p, loss_f)
    assert grads_p.keys() == grads_f.keys() and len(grads_p) == 2 * 3 * len(TARGETS)
    for name, grad in grads_p.items():
        assert torch.equal(grad, grads_f[name]), name
        assert grad.abs().sum() > 0, name


def test_adapter_fast_path_with_dropout_within_bf16_tolerance() -> None:
    plain, fast = tiny(dropout=0.1), tiny(dropout=0.1)
    enable_adapter_fast_path(fast)
    loss_p, grads_p = loss_and_grads(plain)
    loss_f, grads_f = loss_and_grads(fast)
    assert torch.allclose(loss_p, loss_f, rtol=1e-2)
    for name, grad in grads_p.items():
        assert torch.allclose(grad, grads_f[name], rtol=5e-2, atol=5e-2 * grad.abs().max()), name


def test_adapter_fast_path_keeps_the_cast_without_autocast() -> None:
    """Outside autocast (generation, an fp32 evaluation) peft's cast is still needed: bf16
    activations into fp32 adapter weights would be a dtype error."""
    model = tiny()
    enable_adapter_fast_path(model)
    with torch.no_grad():
        out = model(input_ids=batch()["input_ids"])
    assert torch.isfinite(out.logits).all()


def test_dropout_zero_adds_no_op() -> None:
    """lora.dropout 0 is the dropout-free fast path: peft builds no Dropout module at all."""
    kinds = {type(m).__name__ for n, m in tiny(dropout=0.0).named_modules() if "lora_dropout." in n}
    assert kinds == {"Identity"}
    kinds = {type(m).__name__ for n, m in tiny(dropout=0.1).named_modules() if "lora_dropout." in n}
    assert kinds == {"Dropout"}


@pytest.mark.parametrize("count", [0, 1, 3])
def test_partial_checkpointing_is_exact(count: int) -> None:
    reference = tiny(gc=False)
    model = tiny(gc=True)
    checkpoint_last(model, count)
    flags = [layer.gradient_checkpointing for layer in decoder_layers(model)]
    assert flags == [False] * (3 - count) + [True] * count
    loss_r, grads_r = loss_and_grads(reference)
    loss_c, grads_c = loss_and_grads(model)
    assert torch.equal(loss_r, loss_c)
    for name, grad in grads_r.items():
        assert torch.equal(grad, grads_c[name]), name


@pytest.mark.parametrize(
    ("per_layer", "peak_all", "budget", "expected"),
    [
        (1.0, 10.0, 100.0, 0),  # everything fits: nothing to checkpoint
        (10.0, 10.0, 50.0, 28),  # room for 4 of 32 layers' activations
        (10.0, 60.0, 50.0, 32),  # even all-checkpointed exceeds: checkpoint all
        (0.0, 10.0, 50.0, 0),  # a layer keeps nothing: no point checkpointing
    ],
)
def test_layers_to_checkpoint(
    per_layer: float, peak_all: float, budget: float, expected: int
) -> None:
    assert layers_to_checkpoint(32, per_layer, peak_all, budget) == expected


def test_kernels_decision() -> None:
    llama = frozenset({"llama", "mistral"})
    assert kernels_decision("auto", "llama", True, llama) == (True, "Liger kernels for llama")
    use, why = kernels_decision("auto", "llama", True, None)
    assert not use and "no liger-kernel package" in why
    use, why = kernels_decision("auto", "llama", False, llama)
    assert not use and "CUDA" in why
    use, why = kernels_decision("auto", "gpt2", True, llama)
    assert not use and "'gpt2'" in why
    assert kernels_decision("none", "llama", True, llama)[0] is False
    with pytest.raises(SpecError, match=r"spec\.performance\.fusedKernels: liger, but .*CUDA"):
        kernels_decision("liger", "llama", False, llama)
    use, why = kernels_decision("auto", "llama", True, llama, compile_model=True)
    assert not use and "spec.performance.compile" in why
    with pytest.raises(SpecError, match="not combined with spec.performance.compile"):
        kernels_decision("liger", "llama", True, llama, compile_model=True)
    assert kernels_decision("auto", "llama", True, llama, zero_stage=2)[0] is True
    use, why = kernels_decision("auto", "llama", True, llama, zero_stage=3)
    assert not use and "ZeRO-3" in why


def spec(patch: dict[str, Any], make_body: Any) -> LoRAFineTuneSpec:
    return LoRAFineTuneSpec.model_validate(make_body({"spec": patch})["spec"])


def test_apply_performance_on_cpu_says_what_it_did(make_body: Any) -> None:
    model = tiny(gc=True)
    s = spec(
        {
            "training": {"precision": "bf16", "gradientCheckpointing": True},
            "performance": {"checkpointing": "auto"},
        },
        make_body,
    )
    plan = apply_performance(model, s)
    assert plan.adapter_fast_path and not plan.fused_kernels
    assert plan.decoder_layers == 3 and plan.checkpointed_layers == 3
    assert "needs CUDA" in plan.checkpoint_note  # auto sizing falls back to every layer
    model_fp32 = tiny()
    plan = apply_performance(model_fp32, spec({"training": {"precision": "fp32"}}, make_body))
    assert not plan.adapter_fast_path and plan.checkpoint_note.startswith("off")


def test_memory_fraction_out_of_range_names_the_field(make_body: Any) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="performance.memoryFraction"):
        spec({"performance": {"memoryFraction": 0.05}}, make_body)
