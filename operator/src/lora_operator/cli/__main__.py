"""`python -m lora_operator.cli`."""

from lora_operator.cli import entrypoint

entrypoint()
