"""The local kubelet: runs the API's pods as local process groups and reports their status.

It runs every pod whose spec.nodeName is empty or its node name (there is no scheduler),
once (restartPolicy Never) or restarting containers in place (OnFailure, Always; the
restartCount goes up). A pod gets phase Pending (waiting for a ConfigMap/Secret it
references), Running (podIP, containerStatuses, Ready) and then Succeeded or Failed with each
container's exit code (128+N for a signal) and termination message (terminationMessagePath /
terminationMessagePolicy, see podproc.py), written through the /status subresource.

Stopping: a pod that gets a deletionTimestamp (it has finalizers, e.g. a Job's
job-tracking one) or disappears from the API has its process groups sent SIGTERM, then
SIGKILL after terminationGracePeriodSeconds (default 30); a pod that still exists is then
reported Failed with the exit codes, as the kubelet does. On shutdown every pod is killed the
same way (grace capped at `shutdown_grace`).

Each pod gets its own loopback IP (127.0.X.Y). Pod DNS names
(`<hostname>.<subdomain>[.<ns>.svc[.cluster.local]]`) resolve by rewriting them to the IP in
env values, command, args and workingDir (works for any program), plus a sitecustomize hook
on PYTHONPATH that resolves them in Python processes from the runner's hosts file (names
composed at run time); the same hook moves a Python server's wildcard bind on one of the
pod's declared TCP containerPorts to the pod's IP, so pods can serve the same port. See
podproc.py for how a pod maps to processes, volumes, ports and env.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from pathlib import Path

import aiohttp

from lora_operator.local.kubeapi import KubeClient, KubeError, Obj, path
from lora_operator.local.podproc import (
    ContainerProcess,
    Network,
    NotReadyError,
    build_containers,
    pod_fqdn,
)
from lora_operator.local.store import now_iso

logger = logging.getLogger(__name__)
TERMINAL = ("Succeeded", "Failed")


def _condition(ctype: str, ok: bool, reason: str = "") -> Obj:
    cond: Obj = {
        "type": ctype,
        "status": "True" if ok else "False",
        "lastProbeTime": None,
        "lastTransitionTime": now_iso(),
    }
    if reason:
        cond["reason"] = reason
    return cond


class PodWorker:
    """One pod's life: prepare, start, watch the processes, report, stop."""

    def __init__(self, kubelet: Kubelet, pod: Obj) -> None:
        self.kubelet, self.pod = kubelet, pod
        meta = pod["metadata"]
        self.ns, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.fqdn = pod_fqdn(pod)
        self.ip = kubelet.network.ip_for(self.fqdn or f"uid:{self.uid}")
        self.root = kubelet.state / "pods" / self.ns / self.name
        self.containers: list[ContainerProcess] = []
        self.stopping: asyncio.Event = asyncio.Event()
        self.grace = float((pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
        self.report_on_stop = True
        self.start_time = now_iso()
        self.task = asyncio.create_task(self._run(), name=f"pod {self.ns}/{self.name}")

    @property
    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.containers if c.proc is not None and c.running]

    def stop(self, grace: float | None = None, report: bool = True) -> None:
        if grace is not None:
            self.grace = min(self.grace, grace)
        self.report_on_stop = self.report_on_stop and report
        self.stopping.set()

    async def _run(self) -> None:
        try:
            if await self._prepare():
                await self._supervise()
        except asyncio.CancelledError:
            await self._kill()
            raise
        except Exception:  # a broken pod must not take the kubelet down
            logger.exception("pod %s/%s", self.ns, self.name)
            await self._kill()
        finally:
            if self.fqdn:
                self.kubelet.network.unpublish(self.fqdn)

    async def _prepare(self) -> bool:
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        (self.root / "work").mkdir(parents=True)
        while True:
            try:
                self.containers = await build_containers(
                    self.kubelet.client,
                    self.pod,
                    self.ip,
                    self.root,
                    self.kubelet.state,
                    self.kubelet.network,
                )
                return True
            except NotReadyError as exc:
                await self._report_waiting(str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 1.0)
            if self.stopping.is_set():
                if self.report_on_stop:
                    await self._report("Failed")
                return False

    async def _supervise(self) -> None:
        for container in self.containers:
            await container.start()
        if self.fqdn:
            self.kubelet.network.publish(self.fqdn, self.ip)
        policy = (self.pod.get("spec") or {}).get("restartPolicy", "Always")
        waits = {asyncio.ensure_future(c.wait()): c for c in self.containers}
        stop = asyncio.ensure_future(self.stopping.wait())
        await self._report("Running")
        try:
            while waits:
                done, _ = await asyncio.wait([*waits, stop], return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    await self._kill()
                    if self.report_on_stop:
                        await self._report("Failed")
                    return
                for fut in done:
                    container = waits.pop(fut)
                    code = fut.result()
                    if policy == "Always" or (policy == "OnFailure" and code != 0):
                        await self._report("Running")
                        await asyncio.sleep(min(10.0, 0.5 * 2**container.restarts))
                        container.restarts += 1
                        await container.start()
                        waits[asyncio.ensure_future(container.wait())] = container
                await self._report("Running" if waits else self._final_phase())
        finally:
            stop.cancel()
            for fut in waits:
                fut.cancel()

    def _final_phase(self) -> str:
        return "Succeeded" if all(c.exit_code == 0 for c in self.containers) else "Failed"

    async def _kill(self) -> None:
        await asyncio.gather(*(c.kill(self.grace) for c in self.containers))
        for container in self.containers:
            if container.exit_code is None:
                await container.wait()

    async def _report(self, phase: str) -> None:
        running = phase == "Running" and all(c.running for c in self.containers)
        terminal = phase in TERMINAL
        status: Obj = {
            "phase": phase,
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "conditions": [
                _condition("PodReadyToStartContainers", not terminal),
                _condition("Initialized", True),
                _condition("Ready", running, "PodCompleted" if terminal else ""),
                _condition("ContainersReady", running, "PodCompleted" if terminal else ""),
                _condition("PodScheduled", True),
            ],
            "containerStatuses": [c.status() for c in self.containers],
        }
        await self.kubelet.patch_status(self.ns, self.name, status)

    async def _report_waiting(self, message: str) -> None:
        waiting = {"reason": "CreateContainerConfigError", "message": message}
        statuses = [
            {
                "name": c["name"],
                "ready": False,
                "restartCount": 0,
                "image": "",
                "imageID": "",
                "started": False,
                "state": {"waiting": waiting},
            }
            for c in (self.pod.get("spec") or {}).get("containers") or []
        ]
        status = {
            "phase": "Pending",
            "startTime": self.start_time,
            "containerStatuses": statuses,
            "conditions": [_condition("PodScheduled", True)],
        }
        await self.kubelet.patch_status(self.ns, self.name, status)


class Kubelet:
    """Reconciles the API's pods with local process groups (call `sync` on every change)."""

    def __init__(self, client: KubeClient, state: Path, node_name: str = "local") -> None:
        self.client, self.state, self.node_name = client, state, node_name
        self.network = Network(state / "hosts")
        self.workers: dict[str, PodWorker] = {}
        self.finished: set[str] = set()  # pod uids run to the end: a pod never runs twice
        self.shutdown_grace = 5.0

    def log_path(self, namespace: str, pod: str, container: str) -> Path:
        return self.state / "pods" / namespace / pod / f"{container}.log"

    async def patch_status(self, ns: str, name: str, status: Obj) -> None:
        """Write a pod's status; retried on server errors, dropped when the pod is gone."""
        for attempt in range(5):
            try:
                url = path("v1", "pods", ns, name) + "/status"
                await self.client.patch(url, {"status": status})
                return
            except (KubeError, aiohttp.ClientError, TimeoutError) as exc:
                if isinstance(exc, KubeError) and exc.code < 500 and exc.code != 409:
                    return
                await asyncio.sleep(0.2 * (attempt + 1))
        logger.warning("could not report the status of pod %s/%s", ns, name)

    def _mine(self, pod: Obj) -> bool:
        return (pod.get("spec") or {}).get("nodeName") in (None, "", self.node_name)

    async def sync(self) -> None:
        seen: dict[str, Obj] = {}
        for pod in await self.client.list("/api/v1/pods"):
            meta, uid = pod["metadata"], pod["metadata"]["uid"]
            if not self._mine(pod):
                continue
            seen[uid] = pod
            worker = self.workers.get(uid)
            phase = (pod.get("status") or {}).get("phase")
            if worker is None and phase not in TERMINAL and uid not in self.finished:
                if meta.get("deletionTimestamp"):  # deleted before it ever ran
                    await self.patch_status(meta["namespace"], meta["name"], {"phase": "Failed"})
                else:
                    self.workers[uid] = PodWorker(self, pod)
            elif worker is not None and meta.get("deletionTimestamp"):
                worker.stop()
        for uid, worker in list(self.workers.items()):
            if uid not in seen:
                worker.stop(report=False)
            if worker.task.done():
                del self.workers[uid]
                self.finished.add(uid)

    def pids(self) -> dict[str, list[int]]:
        """`namespace/pod` -> PIDs of its running container processes (the group leaders)."""
        return {f"{w.ns}/{w.name}": w.pids for w in self.workers.values()}

    async def shutdown(self) -> None:
        for worker in self.workers.values():
            worker.stop(self.shutdown_grace, report=False)
        await asyncio.gather(*(w.task for w in self.workers.values()), return_exceptions=True)
        self.workers.clear()
