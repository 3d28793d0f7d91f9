"""The DeepSpeed config generated from spec.distributed.deepspeed (pure)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lora_operator.api.spec import LoRAFineTuneSpec

# The operator mounts a user ConfigMap (spec.distributed.deepspeed.configMapRef) here.
USER_CONFIG_ENV = "LORA_DEEPSPEED_CONFIG"


def build_deepspeed_config(spec: LoRAFineTuneSpec) -> dict[str, Any] | None:
    """ZeRO config with "auto" values the HF integration fills from the training args."""
    ds = spec.distributed.deepspeed
    if ds is None:
        return None
    if ds.config_map_ref is not None:
        path = Path(os.environ.get(USER_CONFIG_ENV, "/etc/lora-operator/deepspeed/ds_config.json"))
        user: dict[str, Any] = json.loads(path.read_text())
        return user
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    precision = spec.training.precision
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
