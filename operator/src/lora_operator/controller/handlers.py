"""Thin kopf handlers: read the object and its children, call reconcile, apply the decision.

Every handler (LoRAFineTune create/resume/update, any event of a Job carrying the operator's
labels) runs the same level-triggered `sync` under a per-object lock: GET the LoRAFineTune
and its children, `reconcile`, then create what is missing (409 = already there), patch the
Job's live fields, patch status through the status subresource and post one Event per
transition. Deletion needs no handler: ownerReferences let garbage collection remove the
children, so kopf adds no finalizer.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import threading
from typing import Any, cast

import kopf
import kubernetes

from lora_operator.api import constants as c
from lora_operator.controller.kube import ApiError, Kube, load_client
from lora_operator.controller.reconcile import reconcile
from lora_operator.controller.settings import OperatorConfig

logger = logging.getLogger(__name__)
RETRY_DELAY = 5.0


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def connection_info(config: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the same client configuration the operator's calls use."""
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix(
        "authorization"
    )
    parts = header.split(" ", 1) if header else []
    scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0] if parts else None)
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        scheme=scheme,
        token=token,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
    )


class Controller:
    """The state the handlers share: settings, the API client, per-object locks."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.kube: Kube | None = None
        self._locks: collections.defaultdict[tuple[str, str], asyncio.Lock] = (
            collections.defaultdict(asyncio.Lock)
        )

    def login(self) -> kopf.ConnectionInfo:
        client = load_client(self.config.kubeconfig)
        self.kube = Kube(client)
        return connection_info(client.configuration)

    async def sync(self, namespace: str, name: str) -> None:
        """Bring one LoRAFineTune's children and status in line with its spec."""
        kube = self.kube
        assert kube is not None, "login runs first"
        async with self._locks[(namespace, name)]:
            raw = await asyncio.to_thread(kube.get_lorafinetune, namespace, name)
            if raw is None or raw["metadata"].get("deletionTimestamp"):
                return
            body = kopf.Body(cast(kopf.RawBody, raw))
            observed = await asyncio.to_thread(kube.observe, namespace, name)
            decision = reconcile(raw, observed, self.config, now_iso())
            for child in decision.create:
                if await asyncio.to_thread(kube.create, child):
                    kind, child_name = child["kind"], child["metadata"]["name"]
                    kopf.event(body, type="Normal", reason="Created",
                               message=f"created {kind} {child_name}")  # fmt: skip
            if decision.job_patch is not None:
                await asyncio.to_thread(kube.patch_job, namespace, name, decision.job_patch)
            old = raw.get("status") or {}
            if any(old.get(k) != v for k, v in decision.status.items()):
                await asyncio.to_thread(kube.patch_status, namespace, name, decision.status)
            for note in decision.events:
                kopf.event(body, type=note.type, reason=note.reason, message=note.message)


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    """The operator's handlers, bound to CONFIG (one registry per operator instance)."""
    registry = kopf.OperatorRegistry()
    controller = Controller(config)
    lft = (c.GROUP, c.VERSION, c.PLURAL)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # kopf's bookkeeping in annotations under our group, never in the user's status
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=c.GROUP)
        settings.posting.level = logging.WARNING  # Events: ours, plus kopf's warnings
        settings.peering.name = "lora-operator"
        settings.watching.server_timeout = config.watch_timeout_seconds

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return controller.login()

    async def lorafinetune_changed(name: str, namespace: str | None, **_: Any) -> None:
        try:
            await controller.sync(namespace or "default", name)
        except ApiError as err:
            raise kopf.TemporaryError(str(err), delay=RETRY_DELAY) from err

    for on, handler_id in ((kopf.on.resume, "resume"), (kopf.on.create, "create"),
                           (kopf.on.update, "update")):  # fmt: skip
        on(*lft, id=handler_id, registry=registry)(lorafinetune_changed)

    labels: dict[str, Any] = {
        c.LABEL_MANAGED_BY: c.MANAGED_BY_VALUE,
        c.LABEL_JOB_NAME: kopf.PRESENT,
    }

    @kopf.on.event("batch", "v1", "jobs", labels=labels, registry=registry)
    async def job_changed(labels: kopf.Labels, namespace: str | None, **_: Any) -> None:
        owner = (namespace or "default", labels[c.LABEL_JOB_NAME])
        try:
            await controller.sync(*owner)
        except ApiError as err:  # the next Job event or a resume corrects it
            logger.warning("syncing %s/%s: %s", *owner, err)

    return registry


async def operate(
    config: OperatorConfig,
    *,
    standalone: bool = False,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
) -> None:
    """Run the operator until stop_flag is set (or a signal, under `lora-operator run`).

    kopf cancels every task its loop started while it ran when it stops: embed it in a
    thread with its own loop (threading.Event flags), not next to other tasks.
    """
    await kopf.operator(
        registry=build_registry(config),
        standalone=standalone,
        clusterwide=config.cluster_wide,
        namespaces=list(config.namespaces),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
