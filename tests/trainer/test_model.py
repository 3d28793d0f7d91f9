"""peft LoRA from spec.lora on the tiny model: inits, scaling, LoRA+, target checks."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from lora_operator.api.spec import LoRASpec, ModelSpec, TrainingSpec
from lora_trainer.config import SpecError
from lora_trainer.model import apply_lora, load_base_model


def _model(tiny_assets: Any) -> Any:
    return load_base_model(ModelSpec(source=f"file://{tiny_assets.model_dir}", dtype="float32"))


@pytest.mark.parametrize(
    "init", ["default", "gaussian", "orthogonal", "pissa", "pissa_niter_2", "olora"]
)
def test_every_supported_init_builds_an_adapter(tiny_assets: Any, init: str) -> None:
    model = apply_lora(_model(tiny_assets), LoRASpec(r=4, alpha=8, init=init), False)
    a = [p for n, p in model.named_parameters() if "lora_A" in n]
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(a) == len(b) == 2 * 4  # 2 layers x q,k,v,o
    assert all(p.requires_grad for p in a + b)
    b_zero = all(torch.count_nonzero(p) == 0 for p in b)
    # default init: B = 0 (the known LoRA start); the others start with B != 0
    assert b_zero == (init in ("default", "gaussian"))


def test_rslora_scales_by_sqrt_r(tiny_assets: Any) -> None:
    model = apply_lora(_model(tiny_assets), LoRASpec(r=16, alpha=8, use_rslora=True), False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(16))


def test_target_module_that_matches_nothing_is_a_clear_error(tiny_assets: Any) -> None:
    with pytest.raises(SpecError, match="'gate' matches no linear module.*q_proj"):
        apply_lora(_model(tiny_assets), LoRASpec(target_modules=["q_proj", "gate"]), False)


def test_loraplus_gives_lora_b_a_larger_learning_rate(tiny_assets: Any) -> None:
    from lora_trainer.train import _loraplus_optimizer

    model = apply_lora(_model(tiny_assets), LoRASpec(r=4, lora_plus_lr_ratio=16), False)
    training = TrainingSpec(max_steps=1, learning_rate=1e-4)
    spec: Any = type("S", (), {"lora": LoRASpec(lora_plus_lr_ratio=16), "training": training})
    optimizer = _loraplus_optimizer(spec, model)
    assert optimizer is not None
    lrs = {round(g["lr"], 10) for g in optimizer.param_groups if g["params"]}
    assert lrs == {1e-4, 16e-4}


def test_dora_and_modules_to_save(tiny_assets: Any) -> None:
    spec = LoRASpec(r=4, use_dora=True, modules_to_save=["lm_head"])
    model = apply_lora(_model(tiny_assets), spec, False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA's magnitude
    assert any("lm_head.modules_to_save" in n for n in names)  # trained in full


def test_gradient_checkpointing_keeps_lora_gradients_flowing(tiny_assets: Any) -> None:
    """The field report's silent failure mode: checkpointing without input grads."""
    model = apply_lora(_model(tiny_assets), LoRASpec(r=4), gradient_checkpointing=True)
    model.train()
    ids = torch.randint(0, 500, (2, 32))
    for _ in range(2):  # step 1 makes B non-zero, so A gets a gradient at step 2
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 1e-2 * p.grad
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert grads and all(g is not None for g in grads.values())
    assert all(torch.count_nonzero(g) > 0 for g in grads.values())


def test_resume_skips_a_checkpoint_whose_save_was_interrupted(tmp_path: Any) -> None:
    from lora_trainer.train import latest_complete_checkpoint

    assert latest_complete_checkpoint(tmp_path / "none") is None
    for step, complete in ((10, True), (20, True), (30, False)):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"partial")
        if complete:
            (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-40").mkdir()
    (tmp_path / "checkpoint-40" / "trainer_state.json").write_text('{"global_st')  # torn
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")
