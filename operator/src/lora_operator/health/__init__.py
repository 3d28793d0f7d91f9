"""Health rules: decide, with evidence, when LoRA training is not learning.

Pure: no torch, no kopf, no Kubernetes client, no I/O. The trainer feeds trace records to a
HealthEngine as it writes them; `lora-operator health replay` feeds a whole trace.jsonl.
The rules and their thresholds are documented in docs/health-rules.md (generated from
lora_operator.health.catalog).
"""

from lora_operator.health.catalog import RULES, RULES_BY_NAME
from lora_operator.health.config import HealthConfig, RuleSettings
from lora_operator.health.engine import HealthEngine, RuleState, Transition, worse
from lora_operator.health.records import Record, RecordError, parse_record
from lora_operator.health.rules import Rule
from lora_operator.health.timeline import RuleEntry, Timeline, replay, timeline_of

__all__ = [
    "RULES",
    "RULES_BY_NAME",
    "HealthConfig",
    "HealthEngine",
    "Record",
    "RecordError",
    "Rule",
    "RuleEntry",
    "RuleSettings",
    "RuleState",
    "Timeline",
    "Transition",
    "parse_record",
    "replay",
    "timeline_of",
    "worse",
]
