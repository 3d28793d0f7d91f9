"""The operator's Kubernetes API calls (the kubernetes client, JSON in and out).

Blocking: the handlers call these through `asyncio.to_thread`. Objects stay plain dicts,
as the builders make them and the API serves them; nothing is deserialized into models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes

from lora_operator.api import constants as c
from lora_operator.builders import ChildNames
from lora_operator.controller.reconcile import Observed

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """A non-2xx answer of the API server."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status


def load_client(kubeconfig: Path | None) -> kubernetes.client.ApiClient:
    """An API client: KUBECONFIG's file if given, else in-cluster, else ~/.kube/config."""
    config = kubernetes.client.Configuration()
    if kubeconfig is not None:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            str(kubeconfig), client_configuration=config
        )
    else:
        try:
            kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=config
            )
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
                client_configuration=config
            )
    return kubernetes.client.ApiClient(config)


def object_path(api_version: str, kind_plural: str, namespace: str, name: str = "") -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{base}/namespaces/{namespace}/{kind_plural}" + (f"/{name}" if name else "")


PLURALS = {"ConfigMap": "configmaps", "Service": "services", "Job": "jobs"}


class Kube:
    """The few calls the operator makes."""

    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.client = client

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = JSON
    ) -> dict[str, Any] | None:
        """JSON answer; None for 404; ApiError for other failures."""
        params = self.client.param_serialize(
            method=method,
            resource_path=path,
            header_params={"Accept": JSON, "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.client.call_api(*params)
        response.read()  # type: ignore[no-untyped-call]
        text = response.data.decode() if response.data else ""
        if response.status == 404:
            return None
        if response.status >= 400:
            raise ApiError(response.status, text)
        result: dict[str, Any] = json.loads(text) if text else {}
        return result

    def get_lorafinetune(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.request("GET", object_path(c.API_VERSION, c.PLURAL, namespace, name))

    def observe(self, namespace: str, name: str) -> Observed:
        names = ChildNames(name)

        def get(api_version: str, plural: str, child: str) -> dict[str, Any] | None:
            return self.request("GET", object_path(api_version, plural, namespace, child))

        return Observed(
            configmap=get("v1", "configmaps", names.configmap),
            service=get("v1", "services", names.service),
            job=get("batch/v1", "jobs", names.job),
        )

    def create(self, obj: dict[str, Any]) -> bool:
        """Create OBJ; False when it already exists (409: idempotent, never a duplicate)."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], PLURALS[obj["kind"]], meta["namespace"])
        try:
            self.request("POST", path, obj)
        except ApiError as err:
            if err.status == 409:
                return False
            raise
        return True

    def patch_job(self, namespace: str, name: str, spec_patch: dict[str, Any]) -> None:
        path = object_path("batch/v1", "jobs", namespace, name)
        self.request("PATCH", path, {"spec": spec_patch}, MERGE_PATCH)

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Through the status subresource (a spec write could never sneak in)."""
        path = object_path(c.API_VERSION, c.PLURAL, namespace, name) + "/status"
        self.request("PATCH", path, {"status": status}, MERGE_PATCH)
