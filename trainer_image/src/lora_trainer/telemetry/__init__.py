"""Trainer telemetry: LoRA/Adam statistics (stats), their collection (collect), Prometheus."""

from lora_trainer.telemetry.collect import TelemetryCollector, find_lora
from lora_trainer.telemetry.stats import MatrixStats, ModuleStats, StepStats

__all__ = ["MatrixStats", "ModuleStats", "StepStats", "TelemetryCollector", "find_lora"]
