"""The LoRAFineTune API: models (the single source of the CRD) and shared constants.

Imports neither kopf nor a Kubernetes client (checked by import-linter).
"""

from lora_operator.api.constants import *  # noqa: F403
from lora_operator.api.resource import LoRAFineTune, ObjectMeta
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.api.status import LoRAFineTuneStatus

__all__ = ["LoRAFineTune", "LoRAFineTuneSpec", "LoRAFineTuneStatus", "ObjectMeta"]
