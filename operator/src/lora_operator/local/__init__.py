"""A local stand-in for a cluster: an emulated API server and a pod runner (tests, dev)."""

from lora_operator.local.apiserver import Fault, LocalApiServer, LoggedRequest
from lora_operator.local.podrunner import PodRunner
from lora_operator.local.runner import BackgroundApiServer

__all__ = ["BackgroundApiServer", "Fault", "LocalApiServer", "LoggedRequest", "PodRunner"]
