"""spec.performance: the LoRA adapter fast path, fused kernels, checkpointing sized to memory.

Every setting keeps the plain path's numerics (tests/trainer/test_speed.py on CPU,
tests/trainer/test_speed_gpu.py and the losses in bench/throughput.py's rows on a GPU)
and degrades to the plain path where it cannot apply, saying why.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers.modeling_layers import GradientCheckpointingLayer

from lora_operator.api.spec import LoRAFineTuneSpec
from lora_trainer.config import SpecError

log = logging.getLogger(__name__)


@dataclass
class SpeedPlan:
    """What spec.performance turned into for this run (logged, and kept in summary.json)."""

    adapter_fast_path: bool = False
    fused_kernels: bool = False
    kernels_note: str = ""
    decoder_layers: int = 0
    checkpointed_layers: int = 0
    checkpoint_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the adapter fast path ----------------------------------------------------------------


def _cast_only_without_autocast(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
    """peft casts a LoRA layer's input to the adapter's dtype (fp32 adapters on a bf16 model:
    an fp32 copy of every activation). Under autocast the matmul runs in the compute dtype
    either way, so the copy changes nothing but time and memory: skip it there only."""
    x = args[0] if args else None
    autocast = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
    setattr(module, "cast_input_dtype_enabled", not autocast)  # noqa: B010  # peft's flag


def enable_adapter_fast_path(model: torch.nn.Module) -> int:
    """Install the autocast-aware cast on every plain LoRA Linear (not DoRA); returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and not any(module.use_dora.values()):
            module.register_forward_pre_hook(_cast_only_without_autocast)
            count += 1
    return count


# --- fused kernels ------------------------------------------------------------------------


def liger_model_types() -> frozenset[str] | None:
    """Model types Liger has kernels for, or None when liger-kernel is not installed."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers.monkey_patch import (  # type: ignore[import-not-found]
        MODEL_TYPE_TO_APPLY_LIGER_FN,
    )

    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def kernels_decision(
    mode: str,
    model_type: str,
    cuda: bool,
    supported: frozenset[str] | None,
    compile_model: bool = False,
    zero_stage: int | None = None,
) -> tuple[bool, str]:
    """(use Liger's kernels, why); raises SpecError when `liger` is asked for and impossible."""
    if mode == "none":
        return False, "off (spec.performance.fusedKernels: none)"
    missing = None
    if compile_model:
        # measured: Liger's fused linear cross-entropy under torch.compile hits an illegal
        # memory access in its backward (H200, liger-kernel 0.8.5, torch 2.11)
        missing = "they are not combined with spec.performance.compile"
    elif zero_stage == 3:
        # Liger's fused linear cross-entropy reads lm_head.weight directly, so ZeRO-3's
        # gather hook never fires and the matmul sees an empty shard (trl #5891, #6372)
        missing = "their fused cross-entropy does not work with DeepSpeed ZeRO-3"
    elif supported is None:
        missing = "the trainer image has no liger-kernel package (pip install liger-kernel)"
    elif not cuda:
        missing = "they need a CUDA device (Triton kernels)"
    elif model_type not in supported:
        missing = f"liger-kernel has no kernels for model type {model_type!r}"
    if missing is None:
        return True, f"Liger kernels for {model_type}"
    if mode == "liger":
        raise SpecError(
            f"spec.performance.fusedKernels: liger, but {missing}; "
            "set fusedKernels: auto (use them when possible) or none"
        )
    return False, f"off: {missing}"


def apply_fused_kernels(model: torch.nn.Module) -> None:
    """Liger's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy on the base model."""
    from transformers.integrations.liger import apply_liger_kernel

    apply_liger_kernel(model, {})


# --- checkpointing sized to memory -----------------------------------------------------------


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpoint_last(model: torch.nn.Module, count: int) -> None:
    """Checkpoint the last COUNT decoder layers; the first ones keep their activations."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        setattr(layer, "gradient_checkpointing", i >= len(layers) - count)  # noqa: B010


def layers_to_checkpoint(
    n_layers: int, per_layer_bytes: float, peak_all_bytes: float, budget_bytes: float
) -> int:
    """The fewest checkpointed layers whose planned peak fits BUDGET: each layer not
    checkpointed adds its activations (PER_LAYER) to the all-checkpointed peak."""
    if per_layer_bytes <= 0:
        return 0
    keep = math.floor((budget_bytes - peak_all_bytes) / per_layer_bytes)
    return n_layers - max(0, min(n_layers, keep))


def _probe_batch(micro_batch: int, seq: int, vocab: int, device: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (micro_batch, seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def _step_peak(model: torch.nn.Module, batch: dict[str, Any], dtype: torch.dtype | None) -> int:
    """Peak bytes allocated by one forward + backward (gradients dropped afterwards)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = model(**batch).loss
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    model.zero_grad(set_to_none=True)
    return peak


def measure_layers(
    model: torch.nn.Module, micro_batch: int, seq: int, dtype: torch.dtype | None
) -> tuple[int, int]:
    """(peak with every layer checkpointed, the activations one more kept layer adds), from
    two probe steps on random tokens of the run's micro-batch shape. The kept layer is the
    first: its activations live until the very end of backward, so they add to the peak
    wherever it falls (a kept last layer would only replace the recomputed one)."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    vocab = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
    batch = _probe_batch(micro_batch, seq, vocab, device)
    was_training = model.training
    model.train()
    rng = torch.cuda.get_rng_state(device)
    try:
        checkpoint_last(model, len(layers))
        peak_all = _step_peak(model, batch, dtype)
        checkpoint_last(model, len(layers) - 1)  # the first layer keeps its activations
        peak_one = _step_peak(model, batch, dtype)
    finally:
        torch.cuda.set_rng_state(rng, device)
        model.train(was_training)
    return peak_all, max(0, peak_one - peak_all)


def plan_checkpointing(
    model: torch.nn.Module,
    spec: LoRAFineTuneSpec,
    dtype: torch.dtype | None,
    total_memory: int | None = None,
) -> tuple[int, str]:
    """(checkpointed layers, why) for checkpointing: auto, after measuring on the GPU."""
    perf, t = spec.performance, spec.training
    n = len(decoder_layers(model))
    device = next(model.parameters()).device
    peak_all, per_layer = measure_layers(model, t.micro_batch_size, spec.dataset.max_length, dtype)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adam_state = 2 * 4 * trainable  # exp_avg and exp_avg_sq in fp32, created at step 1
    total = total_memory or torch.cuda.get_device_properties(device).total_memory
    budget = perf.memory_fraction * total
    count = layers_to_checkpoint(n, per_layer, peak_all + adam_state, budget)
    note = (
        f"{count} of {n} layers checkpointed: one layer's activations "
        f"{per_layer / 2**30:.2f} GiB, all-checkpointed peak {peak_all / 2**30:.1f} GiB, "
        f"budget {budget / 2**30:.1f} GiB ({perf.memory_fraction:g} of the GPU)"
    )
    return count, note


# --- the whole plan ----------------------------------------------------------------------------


def apply_performance(model: torch.nn.Module, spec: LoRAFineTuneSpec) -> SpeedPlan:
    """Apply spec.performance to the adapted model (on its training device, before the
    Trainer wraps it) and say what was done."""
    perf, t = spec.performance, spec.training
    plan = SpeedPlan()
    if perf.adapter_fast_path and t.precision != "fp32":
        plan.adapter_fast_path = enable_adapter_fast_path(model) > 0
    cuda = spec.distributed.device == "cuda" and torch.cuda.is_available()
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    plan.fused_kernels, plan.kernels_note = kernels_decision(
        perf.fused_kernels,
        model_type,
        cuda,
        liger_model_types(),
        perf.compile,
        spec.distributed.deepspeed.zero_stage if spec.distributed.deepspeed else None,
    )
    if plan.fused_kernels:
        apply_fused_kernels(model)
    plan.decoder_layers = len(decoder_layers(model))
    if not t.gradient_checkpointing:
        plan.checkpoint_note = "off (training.gradientCheckpointing: false)"
    elif perf.checkpointing == "all":
        plan.checkpointed_layers = plan.decoder_layers
        plan.checkpoint_note = "every layer (spec.performance.checkpointing: all)"
    elif not cuda or spec.distributed.deepspeed is not None:
        plan.checkpointed_layers = plan.decoder_layers
        plan.checkpoint_note = "every layer: auto sizing needs CUDA without DeepSpeed"
    else:
        # without DeepSpeed the Trainer autocasts bf16/fp16 (None: fp32, no autocast)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
        count, plan.checkpoint_note = plan_checkpointing(model, spec, dtype)
        checkpoint_last(model, count)
        plan.checkpointed_layers = count
    log.info(
        "performance: adapter fast path %s; fused kernels %s; checkpointing %s",
        "on" if plan.adapter_fast_path else "off",
        plan.kernels_note,
        plan.checkpoint_note,
    )
    return plan
