"""Deterministic tiny chat model, tokenizer and fine-tuning data, built from code.

`python -m lora_trainer.tiny --out DIR [--seed 0] [--force]`, or `build_tiny_assets()`.
"""

from .build import TinyAssets, build_tiny_assets, default_out_dir

__all__ = ["TinyAssets", "build_tiny_assets", "default_out_dir"]
