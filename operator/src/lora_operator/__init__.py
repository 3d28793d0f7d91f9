"""lora-operator: LoRA fine-tuning on Kubernetes that cannot fail silently."""

__version__ = "0.1.0"
