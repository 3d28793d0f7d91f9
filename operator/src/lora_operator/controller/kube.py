"""The operator's Kubernetes API calls (the kubernetes client, JSON in and out).

Blocking: the handlers call these through `asyncio.to_thread`. Objects stay plain dicts,
as the builders make them and the API serves them; nothing is deserialized into models.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes

from lora_operator.api import constants as c
from lora_operator.builders import ChildNames
from lora_operator.builders.names import TRAINER_CONTAINER
from lora_operator.controller.health_watch import Probe

JOB_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
HEALTH_BODY_LIMIT = 1 << 20  # /health stays small; anything bigger is not one

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

    def get(self, api_version: str, plural: str, namespace: str, name: str) -> Any:
        return self.request("GET", object_path(api_version, plural, namespace, name))

    def preflight(self, namespace: str, name: str) -> tuple[Any, Any]:
        """The pre-flight Job and its latest pod (None, None when there is none)."""
        job = self.get("batch/v1", "jobs", namespace, ChildNames(name).preflight)
        if job is None:
            return None, None
        pods = self.pods(namespace, {c.LABEL_JOB_NAME: name, c.LABEL_ROLE: "preflight"})
        return job, _latest(pods)

    def pods(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        query = urllib.parse.urlencode({"labelSelector": selector})
        answer = self.request("GET", object_path("v1", "pods", namespace) + "?" + query)
        return list((answer or {}).get("items") or [])

    def rank0_endpoint(self, namespace: str, name: str, job_uid: str) -> str | None:
        """http://IP:PORT of the running rank-0 trainer pod of the Job JOB_UID, if any."""
        labels = {c.LABEL_JOB_NAME: name, c.LABEL_ROLE: "trainer", JOB_INDEX_LABEL: "0"}
        pods = [
            p
            for p in self.pods(namespace, labels)
            if (p.get("status") or {}).get("phase") == "Running"
            and (p.get("status") or {}).get("podIP")
            and not p["metadata"].get("deletionTimestamp")
            and any(o.get("uid") == job_uid for o in p["metadata"].get("ownerReferences") or [])
        ]
        pod = _latest(pods)
        if pod is None:
            return None
        ports = [
            port
            for container in pod["spec"].get("containers") or []
            for port in container.get("ports") or []
            if port.get("name") == c.METRICS_PORT_NAME
        ]
        if not ports:
            return None
        return f"http://{pod['status']['podIP']}:{ports[0]['containerPort']}"

    def final_health(self, namespace: str, name: str, job_uid: str) -> dict[str, Any] | None:
        """The last /health body the rank-0 trainer of Job JOB_UID left in its termination
        message, if any."""
        labels = {c.LABEL_JOB_NAME: name, c.LABEL_ROLE: "trainer", JOB_INDEX_LABEL: "0"}
        pods = [
            p
            for p in self.pods(namespace, labels)
            if any(o.get("uid") == job_uid for o in p["metadata"].get("ownerReferences") or [])
        ]
        pod = _latest(pods)
        for status in ((pod or {}).get("status") or {}).get("containerStatuses") or []:
            message = ((status.get("state") or {}).get("terminated") or {}).get("message")
            if status.get("name") == TRAINER_CONTAINER and message:
                try:
                    body = json.loads(message)
                except ValueError:
                    return None  # e.g. the log tail of a crash (FallbackToLogsOnError)
                return body if isinstance(body, dict) else None
        return None

    def delete(self, api_version: str, plural: str, namespace: str, name: str, uid: str) -> None:
        """Delete with a uid precondition (never a newer object of the same name); the
        children go in the background (garbage collection)."""
        body = {"propagationPolicy": "Background", "preconditions": {"uid": uid}}
        try:
            self.request("DELETE", object_path(api_version, plural, namespace, name), body)
        except ApiError as err:
            if err.status != 409:  # 409: the precondition failed, that object is gone
                raise

    def patch_lorafinetune(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.request("PATCH", object_path(c.API_VERSION, c.PLURAL, namespace, name), patch,
                     MERGE_PATCH)  # fmt: skip

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


def _latest(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", default=None)


def read_health(endpoint: str, timeout: float) -> Probe:
    """GET ENDPOINT/health: the JSON body, or the kind of failure (never raises)."""
    try:
        with urllib.request.urlopen(f"{endpoint}/health", timeout=timeout) as response:  # noqa: S310
            data = response.read(HEALTH_BODY_LIMIT + 1)
    except urllib.error.HTTPError as err:
        return Probe(error="http_status", detail=f"HTTP {err.code} from {endpoint}/health")
    except TimeoutError:
        return Probe(error="timeout", detail=f"no answer from {endpoint} within {timeout:g} s")
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, TimeoutError):
            return Probe(error="timeout", detail=f"no answer from {endpoint} within {timeout:g} s")
        return Probe(error="unreachable", detail=f"{endpoint}: {reason}")
    if len(data) > HEALTH_BODY_LIMIT:
        return Probe(error="malformed", detail=f"{endpoint}/health: body over 1 MiB")
    try:
        body = json.loads(data)
    except ValueError:
        return Probe(error="malformed", detail=f"{endpoint}/health: not JSON")
    if not isinstance(body, dict):
        return Probe(error="malformed", detail=f"{endpoint}/health: not a JSON object")
    return Probe(body=body)
