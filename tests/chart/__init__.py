"""The Helm chart (charts/lora-operator), rendered by the real helm."""
