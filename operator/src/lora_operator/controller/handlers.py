"""Thin kopf handlers: read the object and its children, call reconcile, apply the decision.

Every handler (LoRAFineTune create/resume/update, any event of a Job carrying the operator's
labels, and the health timer) runs the same level-triggered `sync` under a per-object lock:
GET the LoRAFineTune and its children (the timer also reads the rank-0 trainer's `/health`),
`reconcile`, then write: status first (through the status subresource, so a restart count
or a Failed phase is recorded before the action it explains) and right after it one Event
per transition it records, the LoRAFineTune's own patch (onDegraded=Suspend) and its Event,
Job deletion (gang restart, onDegraded=Fail), creation of what is missing (409 = already
there, an Event per object created), the Job's live fields, and the TTL deletion.
Deletion of a LoRAFineTune needs no handler: ownerReferences let garbage collection remove
the children, so kopf adds no finalizer; its metrics series are dropped on the DELETED
event.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import logging
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import kopf
import kubernetes

from lora_operator.api import constants as c
from lora_operator.builders import ChildNames
from lora_operator.controller.health_watch import Probe, parse_body
from lora_operator.controller.httpserver import serve, stop
from lora_operator.controller.kube import ApiError, Kube, load_client, read_health
from lora_operator.controller.metrics import OperatorMetrics
from lora_operator.controller.reconcile import (
    TERMINAL_PHASES,
    Decision,
    EventNote,
    Observed,
    job_finished,
    reconcile,
)
from lora_operator.controller.settings import OperatorConfig

logger = logging.getLogger(__name__)
RETRY_DELAY = 5.0
HEARTBEAT_SECONDS = 5.0
API_THREADS = 64
HEARTBEAT_TIMEOUT = 60.0  # /healthz fails when the event loop has not run for this long


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
    """The state the handlers share: settings, the API client, metrics, per-object locks."""

    def __init__(self, config: OperatorConfig, metrics: OperatorMetrics | None = None) -> None:
        self.config = config
        self.kube: Kube | None = None
        self.metrics = metrics or OperatorMetrics()
        self._locks: collections.defaultdict[tuple[str, str], asyncio.Lock] = (
            collections.defaultdict(asyncio.Lock)
        )
        self._endpoints: dict[tuple[str, str], tuple[str, str]] = {}  # -> (job uid, URL)
        self._ticked: set[str] = set()  # uids whose health timer ran once

    def forget(self, namespace: str, name: str) -> None:
        """A deleted LoRAFineTune: drop what is kept for it."""
        self._endpoints.pop((namespace, name), None)
        self._locks.pop((namespace, name), None)
        self.metrics.forget(namespace, name)

    async def spread(self, uid: str) -> None:
        """Before an object's first health tick: wait a stable share of the interval (from
        its uid), so jobs created together do not all read /health in the same instant."""
        if uid in self._ticked:
            return
        self._ticked.add(uid)
        share = zlib.crc32(uid.encode()) / 2**32
        await asyncio.sleep(share * self.config.health_interval_seconds)

    def login(self) -> kopf.ConnectionInfo:
        client = load_client(self.config.kubeconfig)
        self.kube = Kube(client)
        return connection_info(client.configuration)

    async def sync(self, namespace: str, name: str, read_health: bool = False) -> None:
        """Bring one LoRAFineTune's children and status in line with its spec."""
        kube = self.kube
        assert kube is not None, "login runs first"
        async with self._locks[(namespace, name)]:
            with self.metrics.time_reconcile():
                # the reads go out together: the object, its children and (when the
                # rank-0 endpoint is known) /health, whose answer is used only if the Job
                # turns out to be running
                raw, observed, early = await asyncio.gather(
                    asyncio.to_thread(kube.get_lorafinetune, namespace, name),
                    self._observe(kube, namespace, name),
                    self._early_read(namespace, name) if read_health else _none(),
                )
                if raw is None or raw["metadata"].get("deletionTimestamp"):
                    return
                observed = await self._final_health(kube, raw, observed)
                probe = None
                if read_health:
                    probe = await self._probe(kube, namespace, name, observed, early)
                decision = reconcile(raw, observed, self.config, now_iso(), probe)
                await self._apply(kube, raw, decision)
            if decision.delete_self:
                self.metrics.forget(namespace, name)
            else:
                self.metrics.observe(
                    namespace, name, decision.status.get("phase"), decision.degraded_reason
                )

    async def _observe(self, kube: Kube, namespace: str, name: str) -> Observed:
        """The children, read concurrently; the pre-flight Job and pod only while there is
        no training Job (once training started they decide nothing)."""
        names = ChildNames(name)
        job, configmap, service = await asyncio.gather(
            asyncio.to_thread(kube.get, "batch/v1", "jobs", namespace, names.job),
            asyncio.to_thread(kube.get, "v1", "configmaps", namespace, names.configmap),
            asyncio.to_thread(kube.get, "v1", "services", namespace, names.service),
        )
        preflight_job = preflight_pod = None
        if job is None:
            preflight_job, preflight_pod = await asyncio.to_thread(kube.preflight, namespace, name)
        return Observed(configmap, service, job, preflight_job, preflight_pod)

    async def _early_read(self, namespace: str, name: str) -> tuple[str, str, Probe] | None:
        """/health at the cached rank-0 endpoint: (job uid, endpoint, probe), or None."""
        cached = self._endpoints.get((namespace, name))
        if cached is None:
            return None
        probe = await asyncio.to_thread(read_health, cached[1], self.config.health_timeout_seconds)
        return cached[0], cached[1], probe

    async def _final_health(self, kube: Kube, raw: dict[str, Any], observed: Observed) -> Observed:
        """When the training Job just finished: the trainer's final verdict."""
        job = observed.job
        phase = (raw.get("status") or {}).get("phase")
        if job is None or not job_finished(job) or phase in TERMINAL_PHASES:
            return observed
        meta = raw["metadata"]
        final = await asyncio.to_thread(
            kube.final_health, meta.get("namespace") or "default", meta["name"],
            job["metadata"].get("uid") or "",
        )  # fmt: skip
        return dataclasses.replace(observed, final_health=final)

    async def _probe(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        observed: Observed,
        early: tuple[str, str, Probe] | None,
    ) -> Probe | None:
        """A read of the rank-0 trainer's /health while the training Job runs (else None);
        EARLY: the read already made at the cached endpoint."""
        job = observed.job
        key = (namespace, name)
        if job is None or (job.get("spec") or {}).get("suspend") or job_finished(job):
            self._endpoints.pop(key, None)
            return None
        uid = job["metadata"].get("uid") or ""
        endpoint: str | None
        if early is not None and early[0] == uid:
            endpoint, probe = early[1], early[2]
        else:  # a pod LIST only when the rank-0 pod is new
            endpoint = await asyncio.to_thread(kube.rank0_endpoint, namespace, name, uid)
            if endpoint is None:
                return None  # no running rank-0 pod yet: nothing to read
            self._endpoints[key] = (uid, endpoint)
            timeout = self.config.health_timeout_seconds
            probe = await asyncio.to_thread(read_health, endpoint, timeout)
        if probe.error is not None:  # the pod may have ended or moved: then no reading
            self._endpoints.pop(key, None)
            again = await asyncio.to_thread(kube.rank0_endpoint, namespace, name, uid)
            if again != endpoint:
                return None
            self._endpoints[key] = (uid, endpoint)
        kind = probe.error or (None if parse_body(probe.body) is not None else "malformed")
        if kind is not None:
            self.metrics.health_read_error(kind)
            logger.info("%s/%s: /health: %s %s", namespace, name, kind, probe.detail)
        return probe

    async def _apply(self, kube: Kube, raw: dict[str, Any], decision: Decision) -> None:
        meta = raw["metadata"]
        namespace, name = meta.get("namespace") or "default", meta["name"]
        body = kopf.Body(cast(kopf.RawBody, raw))
        old = raw.get("status") or {}
        if any(old.get(k) != v for k, v in decision.status.items()):
            await asyncio.to_thread(kube.patch_status, namespace, name, decision.status)
        # the transitions that status records are announced now: a later write that fails
        # must not lose them (the next reconcile sees no transition any more)
        post_events(body, decision.events)
        if decision.lft_patch is not None:
            await asyncio.to_thread(kube.patch_lorafinetune, namespace, name, decision.lft_patch)
            post_events(body, decision.lft_patch_events)  # retried with the patch otherwise
        job_name = ChildNames(name).job
        if decision.delete_job is not None:
            await asyncio.to_thread(
                kube.delete, "batch/v1", "jobs", namespace, job_name, decision.delete_job
            )
        for child in decision.create:
            if await asyncio.to_thread(kube.create, child):
                kind, child_name = child["kind"], child["metadata"]["name"]
                kopf.event(body, type="Normal", reason="Created",
                           message=f"created {kind} {child_name}")  # fmt: skip
        if decision.job_patch is not None:
            await asyncio.to_thread(kube.patch_job, namespace, job_name, decision.job_patch)
        if decision.delete_self:
            logger.info("%s/%s: ttlSecondsAfterFinished passed: deleting it", namespace, name)
            await asyncio.to_thread(
                kube.delete, c.API_VERSION, c.PLURAL, namespace, name, meta["uid"]
            )


def post_events(body: kopf.Body, notes: list[EventNote]) -> None:
    for note in notes:
        kopf.event(body, type=note.type, reason=note.reason, message=note.message)


def build_registry(config: OperatorConfig, controller: Controller) -> kopf.OperatorRegistry:
    """The operator's handlers, bound to CONTROLLER (one registry per operator instance)."""
    registry = kopf.OperatorRegistry()
    lft = (c.GROUP, c.VERSION, c.PLURAL)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # kopf's bookkeeping in annotations under our group, never in the user's status
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=c.GROUP)
        settings.posting.level = logging.WARNING  # Events: ours, plus kopf's warnings
        settings.peering.name = config.peering or "lora-operator"
        settings.peering.mandatory = config.peering is not None
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

    @kopf.timer(*lft, id="health", interval=config.health_interval_seconds,
                initial_delay=config.health_interval_seconds, registry=registry)  # fmt: skip
    async def health(name: str, namespace: str | None, uid: str, **_: Any) -> None:
        await controller.spread(uid)
        try:
            await controller.sync(namespace or "default", name, read_health=True)
        except ApiError as err:  # the next tick retries
            logger.warning("health of %s/%s: %s", namespace, name, err)

    @kopf.on.event(*lft, registry=registry)
    def lorafinetune_event(
        type: str | None,
        name: str,
        namespace: str | None,
        **_: Any,  # noqa: A002 (kopf's name)
    ) -> None:
        if type == "DELETED":
            controller.forget(namespace or "default", name)

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
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    metrics: OperatorMetrics | None = None,
) -> None:
    """Run the operator until stop_flag is set (or a signal, under `lora-operator run`).

    Serves /metrics, /healthz and /readyz on config.metrics_port while it runs. kopf cancels
    every task its loop started while it ran when it stops: embed it in a thread with its
    own loop (threading.Event flags), not next to other tasks.
    """
    controller = Controller(config, metrics)
    # the API and /health calls block in threads (asyncio.to_thread): enough of them that
    # a thousand jobs' ticks do not queue behind the default pool's few workers
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(API_THREADS, thread_name_prefix="kube"))
    kopf_ready: asyncio.Event | threading.Event = ready_flag or asyncio.Event()
    beat = [time.monotonic()]  # the event loop's heartbeat: /healthz fails when it stalls
    timer: list[asyncio.TimerHandle] = []

    def heartbeat() -> None:
        beat[0] = time.monotonic()
        timer[:] = [loop.call_later(HEARTBEAT_SECONDS, heartbeat)]

    def alive() -> bool:
        return time.monotonic() - beat[0] < HEARTBEAT_TIMEOUT

    heartbeat()
    server = None
    if config.metrics_port is not None:
        server = serve(
            config.metrics_host, config.metrics_port, controller.metrics, kopf_ready.is_set, alive
        )  # fmt: skip
    try:
        await kopf.operator(
            registry=build_registry(config, controller),
            standalone=config.peering is None,
            clusterwide=config.cluster_wide,
            namespaces=list(config.namespaces),
            stop_flag=stop_flag,
            ready_flag=kopf_ready,
        )
    finally:
        for handle in timer:
            handle.cancel()
        if server is not None:
            stop(server)


async def _none() -> None:
    return None
