"""An emulated Kubernetes API server: kmock's KubernetesEmulator with real write semantics.

Use in-process::

    async with LocalApiServer.running() as api:   # api.api_url -> "http://127.0.0.1:PORT"
        ...

or from sync tests::

    with BackgroundApiServer() as api:            # a server thread with its own loop
        subprocess.run(["kubectl", "--server", api.url, ...])

See store.py for the write semantics and catalog.py for discovery and Table output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml

from lora_operator.local.catalog import Catalog, ResourceType, to_table
from lora_operator.local.patching import APPLY_PATCH, PatchError
from lora_operator.local.selectors import SelectorError, field_matcher, label_matcher
from lora_operator.local.store import ApiError, Obj, Store, WatchEvent, not_found

# the reasons a real API server gives with these codes (metav1.StatusReason)
_FAULT_REASONS = {409: "Conflict", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}
_PREFIX = re.compile(r"^/(?:api/(?P<cv>v1)|apis/(?P<g>[^/]+)/(?P<v>[^/]+))(?P<rest>/.*)?$")


@dataclass(frozen=True)
class LoggedRequest:
    """What the server understood of one request (for assertions in tests)."""

    method: str
    path: str
    verb: str
    resource: str = ""
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None
    query: dict[str, str] = field(default_factory=dict)
    user_agent: str = ""


@dataclass
class Fault:
    """Answer the next `times` requests matching `match` with `status`, a delay or a drop."""

    match: Callable[[LoggedRequest], bool]
    times: int = 1
    status: int | None = None
    delay: float = 0.0
    drop_watch: bool = False


@dataclass
class _Route:
    rtype: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None


@attrs.define(kw_only=True)
class LocalApiServer(kmock.KubernetesEmulator):
    """kmock's emulator with the Kubernetes API semantics that stock kmock 0.8 lacks."""

    catalog: Catalog = attrs.field(factory=Catalog)
    store: Store = attrs.field(default=None)
    log: list[LoggedRequest] = attrs.field(factory=list)
    faults: list[Fault] = attrs.field(factory=list)
    bookmark_interval: float = 1.0
    api_url: str = ""
    # (namespace, pod, container) -> the container's log file; set by the local pod runner
    pod_logs: Callable[[str, str, str], Path] | None = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.store = Store(self.catalog)
        ns_type = self.catalog.get("", "v1", "namespaces")
        assert ns_type is not None
        for name in ("default", "kube-system"):
            self.store.create(ns_type, None, {"metadata": {"name": name}})

    # --- public helpers ----------------------------------------------------------------------
    def inject(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def requests_for(self, verb: str | None = None, resource: str | None = None) -> list[Any]:
        return [r for r in self.log if verb in (None, r.verb) and resource in (None, r.resource)]

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[Any]:
        """Serve on host:port (0 = any free port) for the duration of the block."""
        api = cls()
        runner = aiohttp.web.ServerRunner(
            aiohttp.web.Server(api._serve), handle_signals=False, shutdown_timeout=0.1
        )
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        api.api_url = f"http://{bound[0]}:{bound[1]}"
        try:
            yield api
        finally:
            await runner.cleanup()

    # --- dispatch ----------------------------------------------------------------------------
    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:  # kmock's hook
        raw = request._raw_request
        assert raw is not None
        return await self._serve(raw)

    async def _serve(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        body = await raw.read()
        try:
            route, entry = self._route(raw)
            self.log.append(entry)
            fault = self._fault(entry)
            if fault is not None and fault.delay:
                await asyncio.sleep(fault.delay)
            if fault is not None and fault.status:
                reason = _FAULT_REASONS.get(fault.status, "InternalError")
                raise ApiError(fault.status, reason, f"injected fault {fault.status}")
            if route is None:
                return _json(self._discovery(raw.path))
            if entry.verb == "watch":
                drop = fault is not None and fault.drop_watch
                return await self._watch(raw, route, drop)
            if route.subresource == "log" and route.rtype.plural == "pods":
                return self._pod_log(route, raw.query)
            code = 201 if entry.verb == "create" else 200
            return _json(self._resource(raw, route, entry.verb, body), code)
        except ApiError as exc:
            return _json(exc.status(), exc.code)
        except PatchError as exc:
            reason = {400: "BadRequest", 415: "UnsupportedMediaType"}.get(exc.code, "Invalid")
            return _json(ApiError(exc.code, reason, str(exc)).status(), exc.code)
        except (SelectorError, ValueError, yaml.YAMLError) as exc:
            return _json(ApiError(400, "BadRequest", str(exc)).status(), 400)

    def _fault(self, entry: LoggedRequest) -> Fault | None:
        for fault in self.faults:
            if fault.times > 0 and fault.match(entry):
                fault.times -= 1
                return fault
        return None

    def _route(self, raw: aiohttp.web.BaseRequest) -> tuple[_Route | None, LoggedRequest]:
        query = dict(raw.query)
        agent = raw.headers.get("User-Agent", "")
        m = _PREFIX.match(raw.path)
        parts = [p for p in (m.group("rest") or "").split("/") if p] if m else []
        if not m or not parts:  # discovery: verb get, no resource
            return None, LoggedRequest(raw.method, raw.path, "get", query=query, user_agent=agent)
        group, version = (m.group("g") or "", m.group("v") or m.group("cv"))
        if parts[0] == "watch":
            parts, query["watch"] = parts[1:], "true"
        ns = None
        if parts[0] == "namespaces" and len(parts) >= 3:
            candidate = self.catalog.get(group, version, parts[2])
            if candidate is not None and candidate.namespaced:
                ns, parts = parts[1], parts[2:]
        rtype = self.catalog.get(group, version, parts[0])
        if rtype is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = parts[1] if len(parts) > 1 else None
        sub = parts[2] if len(parts) > 2 else None
        verb = _verb(raw.method, name, query)
        entry = LoggedRequest(raw.method, raw.path, verb, rtype.plural, ns, name, sub, query, agent)
        return _Route(rtype, ns, name, sub), entry

    def _discovery(self, path: str) -> Obj:
        if path in ("/", ""):
            return {"paths": ["/api", "/api/v1", "/apis", "/version"]}
        if path == "/version":
            return {
                "major": "1",
                "minor": "35",
                "gitVersion": "v1.35.0-lora-operator-local",
                "platform": "linux/amd64",
            }
        if path == "/api":
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": self.api_url.split("//")[-1]}
                ],
            }
        if path == "/apis":
            return self.catalog.api_group_list()
        m = re.match(r"^/(?:api/(v1)|apis/([^/]+)(?:/([^/]+))?)/?$", path)
        doc: Obj | None = None
        if m and m.group(1):
            doc = self.catalog.resource_list("", "v1")
        elif m and m.group(3):
            doc = self.catalog.resource_list(m.group(2), m.group(3))
        elif m:
            doc = self.catalog.api_group(m.group(2))
        if doc is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return doc

    # --- resource verbs ----------------------------------------------------------------------
    def _resource(self, raw: aiohttp.web.BaseRequest, route: _Route, verb: str, body: bytes) -> Obj:
        rtype, ns, name, sub = route.rtype, route.namespace, route.name, route.subresource
        store, query = self.store, raw.query
        store.strict = query.get("fieldValidation") == "Strict"
        if verb == "list":
            return self._list(raw, rtype, ns)
        if verb == "deletecollection":
            items = self._select(raw, rtype, ns)
            deleted = [
                store.delete(rtype, i["metadata"].get("namespace"), i["metadata"]["name"])
                for i in items
            ]
            return self._list_doc(rtype, deleted)
        if verb == "create":
            return store.create(rtype, ns, _parse(body, raw.content_type))
        assert name is not None
        if verb == "get":
            obj = store.get(rtype, ns, name)
            return self._maybe_table(raw, rtype, [obj]) or obj
        if verb == "update":
            doc = _parse(body, raw.content_type)
            return store.update(rtype, store.get(rtype, ns, name), doc, sub)
        if verb == "patch":
            doc = _parse(body, "yaml" if raw.content_type == APPLY_PATCH else "json")
            manager = query.get("fieldManager")
            return store.patch(rtype, ns, name, raw.content_type, doc, sub, manager)
        if verb == "delete":
            opts = _parse(body, "json") if body else {}
            policy = query.get("propagationPolicy") or opts.get("propagationPolicy")
            return store.delete(rtype, ns, name, orphan=policy == "Orphan")
        raise ApiError(405, "MethodNotAllowed", f"{verb} is not supported")

    def _select(
        self, raw: aiohttp.web.BaseRequest, rtype: ResourceType, ns: str | None
    ) -> list[Obj]:
        labels = label_matcher(raw.query.get("labelSelector"))
        fields = field_matcher(raw.query.get("fieldSelector"))
        return [o for o in self.store.list(rtype, ns) if labels(o) and fields(o)]

    def _list_doc(self, rtype: ResourceType, items: list[Obj]) -> Obj:
        return {
            "kind": f"{rtype.kind}List",
            "apiVersion": rtype.api_version,
            "metadata": {"resourceVersion": str(self.store.rv)},
            "items": items,
        }

    def _list(self, raw: aiohttp.web.BaseRequest, rtype: ResourceType, ns: str | None) -> Obj:
        items = self._select(raw, rtype, ns)
        return self._maybe_table(raw, rtype, items) or self._list_doc(rtype, items)

    def _maybe_table(
        self, raw: aiohttp.web.BaseRequest, rtype: ResourceType, items: list[Obj]
    ) -> Obj | None:
        if "as=Table" not in raw.headers.get("Accept", ""):
            return None
        return to_table(rtype, items, str(self.store.rv))

    def _pod_log(self, route: _Route, query: Any) -> aiohttp.web.Response:
        """GET pods/NAME/log (container, tailLines); `follow` returns what is there now."""
        assert route.name is not None
        pod = self.store.get(route.rtype, route.namespace, route.name)
        names = [c["name"] for c in (pod.get("spec") or {}).get("containers") or []]
        container = query.get("container") or (names[0] if len(names) == 1 else "")
        if container not in names:
            msg = f"a container name must be specified for pod {route.name}, choose one of: {names}"
            raise ApiError(400, "BadRequest", msg)
        log = (
            self.pod_logs(pod["metadata"]["namespace"], route.name, container)
            if self.pod_logs
            else None
        )
        if log is None or not log.exists():
            msg = f'container "{container}" in pod "{route.name}" is waiting to start'
            raise ApiError(400, "BadRequest", msg)
        lines = log.read_text(errors="replace").splitlines(keepends=True)
        if query.get("tailLines"):
            lines = lines[-int(query["tailLines"]) :] if int(query["tailLines"]) else []
        return aiohttp.web.Response(text="".join(lines), content_type="text/plain")

    # --- watch -------------------------------------------------------------------------------
    async def _watch(
        self, raw: aiohttp.web.BaseRequest, route: _Route, drop: bool
    ) -> aiohttp.web.StreamResponse:
        query = raw.query
        labels = label_matcher(query.get("labelSelector"))
        fields = field_matcher(query.get("fieldSelector"))
        rtype, ns = route.rtype, route.namespace

        def wanted(ev: WatchEvent) -> bool:
            obj_ns = ev.obj["metadata"].get("namespace")
            return (
                (ev.group, ev.plural) == (rtype.group, rtype.plural)
                and (not ns or obj_ns == ns)
                and labels(ev.obj)
                and fields(ev.obj)
            )

        queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        backlog = self._backlog(rtype, ns, query.get("resourceVersion"))
        self.store.watchers.add(queue)
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw)
        try:
            if not drop:
                await self._stream(response, query, backlog, queue, wanted)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.watchers.discard(queue)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    def _backlog(self, rtype: ResourceType, ns: str | None, rv: str | None) -> list[WatchEvent]:
        if rv and rv != "0":  # start exactly after rv: only later events (410 if compacted)
            since = int(rv)
            return [e for e in self.store.history if e.rv > since]
        return [
            WatchEvent(int(o["metadata"]["resourceVersion"]), rtype.group, rtype.plural, "ADDED", o)
            for o in self.store.list(rtype, ns)
        ]

    async def _stream(
        self,
        response: aiohttp.web.StreamResponse,
        query: Any,
        backlog: list[WatchEvent],
        queue: asyncio.Queue[WatchEvent],
        wanted: Callable[[WatchEvent], bool],
    ) -> None:
        loop = asyncio.get_running_loop()
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = loop.time() + timeout
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        for event in backlog:
            if wanted(event):
                await _write(response, event.type, event.obj)
        if query.get("sendInitialEvents") == "true" and bookmarks:
            await self._bookmark(response, initial_end=True)
        while (left := deadline - loop.time()) > 0:
            wait = min(left, self.bookmark_interval) if bookmarks else left
            try:
                event = await asyncio.wait_for(queue.get(), wait)
            except TimeoutError:
                if bookmarks:
                    await self._bookmark(response)
                continue
            if wanted(event):
                await _write(response, event.type, event.obj)

    async def _bookmark(
        self, response: aiohttp.web.StreamResponse, initial_end: bool = False
    ) -> None:
        meta: Obj = {"resourceVersion": str(self.store.rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        await _write(response, "BOOKMARK", {"metadata": meta})


def _verb(method: str, name: str | None, query: Any) -> str:
    watch = query.get("watch") in ("true", "1")
    if method == "GET":
        return "watch" if watch else ("get" if name else "list")
    if method == "DELETE":
        return "delete" if name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


def _parse(body: bytes, content_type: str) -> Any:
    if "protobuf" in content_type:
        msg = "protobuf is not supported by this emulator; send JSON (kubectl -f manifests)"
        raise ApiError(415, "UnsupportedMediaType", msg)
    if not body:
        raise ApiError(400, "BadRequest", "the request body is empty")
    return yaml.safe_load(body) if "yaml" in content_type else json.loads(body)


def _json(doc: Obj, status: int = 200) -> aiohttp.web.Response:
    return aiohttp.web.Response(
        text=json.dumps(doc), status=status, content_type="application/json"
    )


async def _write(response: aiohttp.web.StreamResponse, etype: str, obj: Obj) -> None:
    await response.write(json.dumps({"type": etype, "object": obj}).encode() + b"\n")


__all__ = ["Fault", "LocalApiServer", "LoggedRequest", "not_found"]
