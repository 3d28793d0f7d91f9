"""LocalApiServer in a daemon thread with its own event loop, for sync tests (kubectl)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from lora_operator.local.apiserver import LocalApiServer


class BackgroundApiServer:
    """LocalApiServer in a daemon thread with its own event loop (for sync tests)."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.api: LocalApiServer | None = None

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with LocalApiServer.running() as api:
            self.api = api
            self._ready.set()
            await self._stop.wait()

    @property
    def url(self) -> str:
        assert self.api is not None
        return self.api.api_url

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the server's loop (thread-safe access to the store)."""
        assert self._loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def __enter__(self) -> BackgroundApiServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the local API server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
