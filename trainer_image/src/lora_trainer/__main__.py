"""`python -m lora_trainer` (what torchrun starts on every rank)."""

from lora_trainer.cli import entrypoint

entrypoint()
