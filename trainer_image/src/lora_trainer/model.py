"""Base model, tokenizer and the peft LoRA adapter, from spec.model and spec.lora."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lora_operator.api.spec import LoRASpec, ModelSpec
from lora_trainer.config import HF_TOKEN_FILE_ENV, SpecError, resolve_uri

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _location(uri: str) -> tuple[str, dict[str, Any]]:
    """from_pretrained's first argument and hub kwargs for a model/tokenizer URI."""
    if uri.startswith("hf://"):
        kwargs: dict[str, Any] = {}
        token_file = os.environ.get(HF_TOKEN_FILE_ENV)
        if token_file:
            kwargs["token"] = Path(token_file).read_text().strip()
        return uri.removeprefix("hf://"), kwargs
    path = resolve_uri(uri)
    if not (path / "config.json").is_file():
        raise SpecError(f"model path {path} (from {uri}) has no config.json")
    return str(path), {}


def _remote_code_refused(err: ValueError, where: str) -> ValueError:
    """transformers' refusal to run a repository's code, as a spec error naming the field."""
    if "trust_remote_code=True" not in str(err):  # transformers' hint in its refusal
        return err
    return ValueError(
        f"{where} needs custom code shipped with the model (trust_remote_code); it was not "
        "loaded. Set spec.model.trustRemoteCode: true only if you trust that code."
    )


def load_tokenizer(spec: ModelSpec) -> Any:
    where, kwargs = _location(spec.tokenizer or spec.source)
    if spec.revision:
        kwargs["revision"] = spec.revision
    try:
        return AutoTokenizer.from_pretrained(
            where, trust_remote_code=spec.trust_remote_code, **kwargs
        )
    except ValueError as err:
        raise _remote_code_refused(err, where) from err


def load_base_model(spec: ModelSpec, vocab_size: int | None = None) -> PreTrainedModel:
    """The base model in spec.dtype with sdpa attention; embeddings resized if asked."""
    where, kwargs = _location(spec.source)
    if spec.revision:
        kwargs["revision"] = spec.revision
    dtype = DTYPES.get(spec.dtype, "auto")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where,
            dtype=dtype,
            attn_implementation="sdpa",
            trust_remote_code=spec.trust_remote_code,
            **kwargs,
        )
    except ValueError as err:
        raise _remote_code_refused(err, where) from err
    embeddings: Any = model.get_input_embeddings()
    if vocab_size is not None and vocab_size != embeddings.weight.shape[0]:
        model.resize_token_embeddings(vocab_size)
    return model


def lora_config(spec: LoRASpec) -> LoraConfig:
    init: bool | str = True if spec.init == "default" else spec.init
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # peft accepts floats
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        modules_to_save=list(spec.modules_to_save) or None,
        init_lora_weights=init,  # type: ignore[arg-type]
        use_rslora=spec.use_rslora,
        use_dora=spec.use_dora,
        task_type="CAUSAL_LM",
    )


def check_target_modules(model: torch.nn.Module, targets: list[str], n_layers: int) -> Counter[str]:
    """Per target name, the linear modules it matches; fail when one matches too few."""
    names = Counter(
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    )
    matched = Counter({t: names.get(t, 0) for t in targets})
    for target, count in matched.items():
        if count == 0:
            known = ", ".join(sorted(n for n in names if n != "lm_head"))
            raise SpecError(
                f"spec.lora.targetModules: {target!r} matches no linear module of this model; "
                f"its linear modules are: {known}"
            )
        if count < n_layers:
            raise SpecError(
                f"spec.lora.targetModules: {target!r} matches {count} modules but the model "
                f"has {n_layers} layers; check the name"
            )
    return matched


def apply_lora(model: PreTrainedModel, spec: LoRASpec, gradient_checkpointing: bool) -> PeftModel:
    """Wrap the model with the adapter; log trainable parameters and adapted modules."""
    n_layers = int(getattr(model.config, "num_hidden_layers", 1))
    matched = check_target_modules(model, list(spec.target_modules), n_layers)
    if gradient_checkpointing:
        # Non-reentrant checkpointing and input grads keep LoRA gradients flowing.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, lora_config(spec))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info(
        "LoRA adapted %d modules (%s); trainable parameters %d of %d (%.3f%%)",
        sum(matched.values()),
        ", ".join(f"{k} x{v}" for k, v in matched.items()),
        trainable,
        total,
        100.0 * trainable / max(total, 1),
    )
    return peft_model
