"""LoRA trainer that runs inside lora-operator's training pods."""
