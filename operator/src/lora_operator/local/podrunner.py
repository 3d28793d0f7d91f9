"""The local pod runner: the Job controller and the kubelet against one API server URL.

    async with PodRunner.running(api.api_url) as runner:   # api: a LocalApiServer
        ...  # create Jobs; their pods run as local processes

Both reconcile level-triggered: a watch on Jobs and on Pods wakes them, and they resync every
`resync` seconds anyway (activeDeadlineSeconds, missed events). Container images are ignored:
commands run on this machine with the current Python environment (see podproc.py for the
mapping of hostnames, volumes and env, kubelet.py and jobs.py for the semantics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from lora_operator.local.jobs import JOBS, PODS, JobController
from lora_operator.local.kubeapi import KubeClient, KubeError, watch_forever
from lora_operator.local.kubelet import Kubelet
from lora_operator.local.podproc import signal_tree

logger = logging.getLogger(__name__)


class PodRunner:
    """Runs the Jobs and Pods of the API at `url` as local processes until stopped."""

    def __init__(self, url: str, state_dir: Path | None = None, resync: float = 1.0) -> None:
        self.url, self.resync = url, resync
        self._own_state = state_dir is None
        self.state = (
            Path(tempfile.mkdtemp(prefix="lora-local-")) if state_dir is None else state_dir
        )
        self.state.mkdir(parents=True, exist_ok=True)
        self.client = KubeClient(url)
        self.kubelet = Kubelet(self.client, self.state)
        self.jobs = JobController(self.client)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, url: str, state_dir: Path | None = None) -> AsyncIterator[PodRunner]:
        runner = cls(url, state_dir)
        await runner.start()
        try:
            yield runner
        finally:
            await runner.stop()

    async def start(self) -> None:
        await self.client.__aenter__()
        self._tasks = [
            asyncio.create_task(watch_forever(self.client, JOBS, self._wake)),
            asyncio.create_task(watch_forever(self.client, PODS, self._wake)),
            asyncio.create_task(self._loop()),
        ]

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.jobs.sync()
                await self.kubelet.sync()
            except (KubeError, OSError) as exc:
                logger.warning("local runner: %s", exc)
            except Exception:
                logger.exception("local runner")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.resync)

    def log_path(self, namespace: str, pod: str, container: str) -> Path:
        """Where a container's stdout and stderr go."""
        return self.kubelet.log_path(namespace, pod, container)

    def pids(self) -> dict[str, list[int]]:
        return self.kubelet.pids()

    def signal_pod(self, namespace: str, pod: str, sig: int) -> int:
        """A fault: send SIG to every process of the pod's containers (each container's
        process and all its descendants, as its PID namespace would hold them, even those a
        launcher put in their own sessions); the number of processes signalled."""
        leaders = self.pids().get(f"{namespace}/{pod}") or []
        return sum(signal_tree(leader, sig) for leader in leaders)

    async def stop(self) -> None:
        """Stop reconciling, kill every pod's process tree, close the client."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.kubelet.shutdown()
        await self.client.__aexit__()
        if self._own_state:
            shutil.rmtree(self.state, ignore_errors=True)
