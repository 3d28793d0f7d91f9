"""A local, in-process stand-in for the Kubernetes API server (tests and demos)."""

from lora_operator.local.apiserver import Fault, LocalApiServer, LoggedRequest
from lora_operator.local.runner import BackgroundApiServer

__all__ = ["BackgroundApiServer", "Fault", "LocalApiServer", "LoggedRequest"]
