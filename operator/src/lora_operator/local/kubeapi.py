"""A minimal asyncio Kubernetes API client (aiohttp) for the local pod runner.

Talks plain JSON over HTTP to the emulated API server (no auth), so the runner also works
against a LocalApiServer in another process. Only what the runner needs: get, list, create,
merge patches (main resource and /status), delete and a watch used as a wake-up signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

Obj = dict[str, Any]
MERGE = {"Content-Type": "application/merge-patch+json"}


class KubeError(Exception):
    """A non-2xx answer: code and the metav1.Status reason."""

    def __init__(self, code: int, status: Any) -> None:
        reason = status.get("reason", "") if isinstance(status, dict) else ""
        message = status.get("message", "") if isinstance(status, dict) else str(status)
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason = code, reason


def path(api_version: str, plural: str, namespace: str | None = None, name: str = "") -> str:
    """The URL path of a collection or an object (`/api/v1/...` or `/apis/g/v/...`)."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    return f"{base}/{name}" if name else base


class KubeClient:
    """JSON requests against one API server URL."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeClient:
        self._session = aiohttp.ClientSession(headers={"User-Agent": "lora-operator-local"})
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self, method: str, url_path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Any:
        assert self._session is not None
        data = None if body is None else json.dumps(body)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        async with self._session.request(
            method, self.url + url_path, data=data, headers=hdrs
        ) as resp:
            text = await resp.text()
            doc = json.loads(text) if text else None
            if resp.status >= 400:
                raise KubeError(resp.status, doc)
            return doc

    async def get(self, url_path: str) -> Obj | None:
        """The object, or None when it does not exist."""
        try:
            doc: Obj = await self.request("GET", url_path)
        except KubeError as exc:
            if exc.code == 404:
                return None
            raise
        return doc

    async def list(self, url_path: str) -> list[Obj]:
        doc = await self.request("GET", url_path)
        items: list[Obj] = doc.get("items") or []
        return items

    async def create(self, url_path: str, body: Obj) -> Obj:
        doc: Obj = await self.request("POST", url_path, body)
        return doc

    async def patch(self, url_path: str, body: Obj) -> Obj | None:
        """A JSON merge patch; None when the object is gone."""
        try:
            doc: Obj = await self.request("PATCH", url_path, body, MERGE)
        except KubeError as exc:
            if exc.code == 404:
                return None
            raise
        return doc

    async def delete(self, url_path: str) -> None:
        with contextlib.suppress(KubeError):
            await self.request("DELETE", url_path, {"propagationPolicy": "Background"})

    async def watch(self, url_path: str, timeout: int = 60) -> AsyncIterator[Obj]:
        """Watch events of a collection (from now on) until the server ends the stream."""
        assert self._session is not None
        query = f"?watch=true&timeoutSeconds={timeout}&allowWatchBookmarks=true"
        lst = await self.request("GET", url_path)
        query += f"&resourceVersion={lst['metadata']['resourceVersion']}"
        async with self._session.get(self.url + url_path + query) as resp:
            async for line in resp.content:
                if line.strip():
                    yield json.loads(line)


async def watch_forever(client: KubeClient, url_path: str, wake: asyncio.Event) -> None:
    """Set `wake` on every change of the collection; reconnect when the stream ends."""
    while True:
        try:
            async for event in client.watch(url_path):
                if event.get("type") != "BOOKMARK":
                    wake.set()
        except (aiohttp.ClientError, KubeError, json.JSONDecodeError):
            await asyncio.sleep(0.5)
        wake.set()  # a re-list is a resync: anything may have changed meanwhile
