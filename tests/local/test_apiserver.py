"""The emulated API server behaves as kube-apiserver does where the operator depends on it.

References: the API conventions
(https://github.com/kubernetes/community/blob/master/contributors/devel/sig-architecture/api-conventions.md)
and the API concepts page (https://kubernetes.io/docs/reference/using-api/api-concepts/).
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from lora_operator.local import BackgroundApiServer, Fault, LocalApiServer

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = ROOT / ".venv" / "bin" / "kubectl"
CRD = yaml.safe_load((ROOT / "crds" / "lorafinetunes.lora-operator.dev.yaml").read_text())
QUICKSTART = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
LFTS = "/apis/lora-operator.dev/v1alpha1/namespaces/default/lorafinetunes"
CMS = "/api/v1/namespaces/default/configmaps"
PODS = "/api/v1/namespaces/default/pods"
MERGE = {"Content-Type": "application/merge-patch+json"}
JSONP = {"Content-Type": "application/json-patch+json"}


class Client:
    def __init__(self, api: LocalApiServer, session: aiohttp.ClientSession) -> None:
        self.api, self.session = api, session

    async def req(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body)
        async with self.session.request(method, self.api.api_url + path, data=data, **kw) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    async with LocalApiServer.running() as api, aiohttp.ClientSession() as session:
        api.bookmark_interval = 0.1
        cl = Client(api, session)
        code, _ = await cl.req(
            "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", CRD
        )
        assert code == 201
        yield cl


async def test_metadata_on_create_and_generation(client: Client) -> None:
    code, obj = await client.req("POST", LFTS, QUICKSTART)
    assert code == 201
    meta = obj["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["namespace"] == "default"
    assert meta["generation"] == 1
    rv1 = int(meta["resourceVersion"])
    # metadata-only and status writes do not bump generation; spec writes do
    _, obj = await client.req(
        "PATCH", f"{LFTS}/quickstart", {"metadata": {"labels": {"a": "b"}}}, headers=MERGE
    )
    assert obj["metadata"]["generation"] == 1 and int(obj["metadata"]["resourceVersion"]) > rv1
    _, obj = await client.req(
        "PATCH", f"{LFTS}/quickstart/status", {"status": {"phase": "Running"}}, headers=MERGE
    )
    assert obj["metadata"]["generation"] == 1 and obj["status"]["phase"] == "Running"
    _, obj = await client.req(
        "PATCH", f"{LFTS}/quickstart", {"spec": {"lora": {"r": 8}}}, headers=MERGE
    )
    assert obj["metadata"]["generation"] == 2
    code, dup = await client.req("POST", LFTS, QUICKSTART)
    assert code == 409 and dup["reason"] == "AlreadyExists" and dup["kind"] == "Status"
    code, missing = await client.req("GET", f"{LFTS}/nope")
    assert code == 404 and missing["reason"] == "NotFound"
    assert missing["details"] == {
        "name": "nope",
        "group": "lora-operator.dev",
        "kind": "lorafinetunes",
    }


async def test_optimistic_concurrency(client: Client) -> None:
    _, obj = await client.req("POST", CMS, {"metadata": {"name": "c"}, "data": {"k": "1"}})
    rv = obj["metadata"]["resourceVersion"]
    _, obj2 = await client.req("PUT", f"{CMS}/c", {**obj, "data": {"k": "2"}})
    # a PUT carrying the old resourceVersion is a 409 Conflict (optimistic concurrency)
    code, status = await client.req("PUT", f"{CMS}/c", {**obj, "data": {"k": "3"}})
    assert code == 409 and status["reason"] == "Conflict"
    # JSON patch `test` ops fail with 422 (kube-apiserver), succeed on the current value
    stale = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "replace", "path": "/data/k", "value": "4"},
    ]
    code, _ = await client.req("PATCH", f"{CMS}/c", stale, headers=JSONP)
    assert code == 422
    fresh = copy.deepcopy(stale)
    fresh[0]["value"] = obj2["metadata"]["resourceVersion"]
    code, obj3 = await client.req("PATCH", f"{CMS}/c", fresh, headers=JSONP)
    assert code == 200 and obj3["data"]["k"] == "4"
    # a merge patch with a stale metadata.resourceVersion is a precondition: 409
    code, _ = await client.req(
        "PATCH", f"{CMS}/c", {"metadata": {"resourceVersion": rv}}, headers=MERGE
    )
    assert code == 409


async def test_status_subresource_isolated(client: Client) -> None:
    body = {**QUICKSTART, "status": {"phase": "Bogus"}}
    _, obj = await client.req("POST", LFTS, body)
    assert "status" not in obj  # status is ignored on create for CRDs with /status
    _, obj = await client.req(
        "PATCH",
        f"{LFTS}/quickstart/status",
        {"spec": {"lora": {"r": 4}}, "status": {"phase": "Running"}},
        headers=MERGE,
    )
    assert obj["spec"]["lora"]["r"] == 16 and obj["status"]["phase"] == "Running"
    _, obj = await client.req(
        "PATCH", f"{LFTS}/quickstart", {"status": {"phase": "Failed"}}, headers=MERGE
    )
    assert obj["status"]["phase"] == "Running"
    obj["status"] = {"phase": "Succeeded"}
    code, obj = await client.req("PUT", f"{LFTS}/quickstart/status", obj)
    assert code == 200 and obj["status"]["phase"] == "Succeeded"


async def test_strategic_merge_and_server_side_apply(client: Client) -> None:
    pod = {
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]},
    }
    await client.req("POST", PODS, pod)
    smp = {"spec": {"containers": [{"name": "b", "image": "z"}]}}
    _, obj = await client.req(
        "PATCH",
        f"{PODS}/p",
        smp,
        headers={"Content-Type": "application/strategic-merge-patch+json"},
    )
    assert [(c["name"], c["image"]) for c in obj["spec"]["containers"]] == [("a", "x"), ("b", "z")]
    apply = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "ssa"},
        "data": {"x": "1"},
    }
    code, obj = await client.req(
        "PATCH",
        f"{CMS}/ssa?fieldManager=me",
        apply,
        headers={"Content-Type": "application/apply-patch+yaml"},
    )
    assert code == 200 and obj["data"] == {"x": "1"}
    assert obj["metadata"]["managedFields"][0]["manager"] == "me"
    assert obj["metadata"]["managedFields"][0]["operation"] == "Apply"


async def test_lists_selectors_generate_name_collection_delete(client: Client) -> None:
    for i, env in enumerate(["prod", "dev", "test"]):
        await client.req("POST", CMS, {"metadata": {"name": f"c{i}", "labels": {"env": env}}})
    code, gen = await client.req("POST", CMS, {"metadata": {"generateName": "g-"}})
    assert code == 201 and gen["metadata"]["name"].startswith("g-")
    assert len(gen["metadata"]["name"]) == len("g-") + 5

    async def names(query: str) -> list[str]:
        _, doc = await client.req("GET", f"{CMS}?{query}")
        assert doc["kind"] == "ConfigMapList" and doc["apiVersion"] == "v1"
        assert doc["metadata"]["resourceVersion"]
        return sorted(i["metadata"]["name"] for i in doc["items"])

    assert await names("labelSelector=env=prod") == ["c0"]
    assert await names("labelSelector=env!=prod") == ["c1", "c2", gen["metadata"]["name"]]
    assert await names("labelSelector=env in (dev,test)") == ["c1", "c2"]
    assert await names("labelSelector=env notin (dev,test),env") == ["c0"]
    assert await names("labelSelector=!env") == [gen["metadata"]["name"]]
    assert await names("fieldSelector=metadata.name=c2") == ["c2"]
    assert await names("fieldSelector=metadata.namespace=other") == []
    code, _ = await client.req("DELETE", f"{CMS}?labelSelector=env")
    assert code == 200
    assert await names("") == [gen["metadata"]["name"]]


async def _watch(client: Client, query: str, count: int) -> list[dict[str, Any]]:
    events = []
    async with client.session.get(f"{client.api.api_url}{CMS}?watch=true&{query}") as resp:
        async for line in resp.content:
            events.append(json.loads(line))
            if len(events) >= count:
                break
    return events


async def test_watch_from_resource_version_bookmarks_timeout(client: Client) -> None:
    _, first = await client.req("POST", CMS, {"metadata": {"name": "w1"}})
    rv = first["metadata"]["resourceVersion"]
    await client.req("POST", CMS, {"metadata": {"name": "w2"}})
    # watching from a resourceVersion delivers only the later events
    events = await _watch(client, f"resourceVersion={rv}", 1)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "w2")]
    events = await _watch(client, f"resourceVersion={rv}&allowWatchBookmarks=true", 2)
    assert events[1]["type"] == "BOOKMARK"
    loop = asyncio.get_running_loop()
    start = loop.time()
    events = await _watch(client, f"resourceVersion={rv}&timeoutSeconds=1", 99)
    assert len(events) == 1 and 0.9 < loop.time() - start < 3


async def test_finalizers_and_garbage_collection(client: Client) -> None:
    _, owner = await client.req(
        "POST",
        LFTS,
        {
            **QUICKSTART,
            "metadata": {"name": "quickstart", "finalizers": ["lora-operator.dev/cleanup"]},
        },
    )
    ref = {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": "quickstart",
        "uid": owner["metadata"]["uid"],
    }
    await client.req("POST", CMS, {"metadata": {"name": "child", "ownerReferences": [ref]}})
    code, marked = await client.req("DELETE", f"{LFTS}/quickstart")
    assert code == 200 and marked["metadata"]["deletionTimestamp"]
    assert (await client.req("GET", f"{LFTS}/quickstart"))[0] == 200  # only marked
    await client.req(
        "PATCH", f"{LFTS}/quickstart", {"metadata": {"finalizers": None}}, headers=MERGE
    )
    assert (await client.req("GET", f"{LFTS}/quickstart"))[0] == 404
    await asyncio.sleep(0.2)  # background cascading deletion
    assert (await client.req("GET", f"{CMS}/child"))[0] == 404
    for path in (
        "/api/v1/namespaces/default/events",
        "/apis/events.k8s.io/v1/namespaces/default/events",
    ):
        code, _ = await client.req(
            "POST", path, {"metadata": {"generateName": "e-"}, "reason": "Started"}
        )
        assert code == 201
        assert len((await client.req("GET", path))[1]["items"]) == 1


async def test_validation_table_discovery(client: Client) -> None:
    bad = copy.deepcopy(QUICKSTART)
    bad["spec"]["lora"]["r"] = 0
    code, status = await client.req("POST", LFTS, bad)
    assert code == 422 and status["reason"] == "Invalid"
    assert [c["field"] for c in status["details"]["causes"]] == ["spec.lora.r"]
    # unknown fields are pruned by default, rejected (400) with fieldValidation=Strict
    extra = copy.deepcopy(QUICKSTART)
    extra["spec"]["lora"]["bogus"] = 1
    code, status = await client.req("POST", f"{LFTS}?fieldValidation=Strict", extra)
    assert code == 400 and "spec.lora.bogus" in status["message"]
    _, obj = await client.req("POST", LFTS, extra)
    assert "bogus" not in obj["spec"]["lora"]
    assert obj["spec"]["lora"]["dropout"] == 0.05  # schema defaults applied on write
    _, res = await client.req("GET", "/apis/lora-operator.dev/v1alpha1")
    assert {r["name"] for r in res["resources"]} == {"lorafinetunes", "lorafinetunes/status"}
    _, v1 = await client.req("GET", "/api/v1")
    assert v1["groupVersion"] == "v1"
    accept = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}
    _, table = await client.req("GET", LFTS, headers=accept)
    assert [c["name"] for c in table["columnDefinitions"]][:6] == [
        "Name",
        "Phase",
        "Health",
        "Step",
        "Loss",
        "Age",
    ]


async def test_request_log_and_faults(client: Client) -> None:
    client.api.inject(Fault(lambda r: r.verb == "patch" and r.subresource == "status", status=409))
    await client.req("POST", LFTS, QUICKSTART)
    code, _ = await client.req("PATCH", f"{LFTS}/quickstart/status", {"status": {}}, headers=MERGE)
    assert code == 409
    code, _ = await client.req("PATCH", f"{LFTS}/quickstart/status", {"status": {}}, headers=MERGE)
    assert code == 200
    last = client.api.log[-1]
    assert (last.verb, last.resource, last.namespace, last.subresource) == (
        "patch",
        "lorafinetunes",
        "default",
        "status",
    )
    client.api.inject(Fault(lambda r: r.verb == "get", delay=0.3))
    start = asyncio.get_running_loop().time()
    assert (await client.req("GET", f"{LFTS}/quickstart"))[0] == 200
    assert asyncio.get_running_loop().time() - start >= 0.3
    client.api.inject(Fault(lambda r: r.verb == "watch", drop_watch=True))
    assert await _watch(client, "", 5) == []


# --- real kubectl ----------------------------------------------------------------------------
@pytest.fixture
def kubectl(tmp_path: Path) -> Iterator[Any]:
    if not KUBECTL.exists():
        pytest.skip("kubectl missing: bash scripts/install-tools.sh .venv")
    with BackgroundApiServer() as server:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "local",
            "clusters": [{"name": "local", "cluster": {"server": server.url}}],
            "contexts": [
                {"name": "local", "context": {"cluster": "local", "namespace": "default"}}
            ],
            "users": [],
        }
        (tmp_path / "config").write_text(yaml.safe_dump(config))
        env = {
            **os.environ,
            "KUBECONFIG": str(tmp_path / "config"),
            "KUBECACHEDIR": str(tmp_path / "cache"),
        }

        def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(KUBECTL), *args],
                env=env,
                input=stdin,
                text=True,
                capture_output=True,
                timeout=30,
                cwd=ROOT,
            )

        yield run


def test_kubectl_end_to_end(kubectl: Any) -> None:
    out = kubectl("apply", "--validate=false", "-f", "crds/")
    assert out.returncode == 0, out.stderr
    crd = "crd/lorafinetunes.lora-operator.dev"
    out = kubectl("wait", "--for=condition=Established", crd, "--timeout=5s")
    assert out.returncode == 0, out.stderr
    out = kubectl("apply", "--validate=false", "-f", "examples/quickstart.yaml")
    assert out.returncode == 0 and "created" in out.stdout, out.stderr
    status = json.dumps({"status": {"phase": "Running", "progress": {"step": 7}}})
    out = kubectl(
        "patch", "lft", "quickstart", "--subresource=status", "--type=merge", "-p", status
    )
    assert out.returncode == 0, out.stderr
    out = kubectl("get", "lft")
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "HEALTH", "STEP", "LOSS", "AGE"]
    # missing cells (Health, Loss) print as blanks, as with a real server
    assert row.split()[:3] == ["quickstart", "Running", "7"]
    out = kubectl("apply", "--server-side", "--validate=false", "-f", "examples/quickstart.yaml")
    assert out.returncode == 0, out.stderr
    bad = copy.deepcopy(QUICKSTART)
    bad["metadata"]["name"], bad["spec"]["lora"]["r"] = "bad", 0
    out = kubectl("apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump(bad))
    assert out.returncode != 0 and "spec.lora.r" in out.stderr
    out = kubectl("delete", "lft", "quickstart")
    assert out.returncode == 0 and "deleted" in out.stdout, out.stderr
    assert kubectl("get", "lft", "quickstart").returncode != 0


# --- a tiny in-process kopf operator against the emulator ------------------------------------
async def _until(check: Any, timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if result := await check():
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


def _kopf_registry(url: str) -> Any:
    import kopf

    registry = kopf.OperatorRegistry()

    # A fresh registry has no login handler: point kopf at the emulator explicitly.
    @kopf.on.login(registry=registry)
    def login(**_: Any) -> Any:
        return kopf.ConnectionInfo(server=url)

    @kopf.on.create("lora-operator.dev", "v1alpha1", "lorafinetunes", registry=registry)
    async def create(body: Any, name: str, namespace: str, patch: Any, **_: Any) -> None:
        child: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap",
                                 "metadata": {"name": f"{name}-child"}}  # fmt: skip
        kopf.adopt(child, owner=body)
        async with aiohttp.ClientSession() as session:
            await session.post(f"{url}/api/v1/namespaces/{namespace}/configmaps", json=child)
        kopf.info(body, reason="ChildCreated", message="configmap created")
        patch.status["phase"] = "Pending"  # kopf writes it through PATCH .../status

    @kopf.on.delete("lora-operator.dev", "v1alpha1", "lorafinetunes", registry=registry)
    def delete(**_: Any) -> None:
        pass

    return registry


@pytest.mark.slow
async def test_kopf_operator_in_process(client: Client) -> None:
    import kopf

    settings = kopf.OperatorSettings()
    settings.posting.level = 0
    settings.watching.server_timeout = 5
    stop = asyncio.Event()
    task = asyncio.create_task(kopf.operator(
        registry=_kopf_registry(client.api.api_url), settings=settings, standalone=True,
        namespaces=["default"], stop_flag=stop))  # fmt: skip
    try:
        await client.req("POST", LFTS, QUICKSTART)

        async def created() -> Any:
            _, obj = await client.req("GET", f"{LFTS}/quickstart")
            return obj if obj.get("status", {}).get("phase") else None

        obj = await _until(created)
        assert obj["status"]["phase"] == "Pending"
        assert obj["metadata"]["finalizers"]  # kopf's finalizer for the delete handler
        _, child = await client.req("GET", f"{CMS}/quickstart-child")
        assert child["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
        events = await _until(lambda: _events(client, "ChildCreated"))
        assert events[0]["involvedObject"]["name"] == "quickstart"
        await client.req("DELETE", f"{LFTS}/quickstart")

        async def gone() -> bool:
            codes = [(await client.req("GET", p))[0] for p in
                     (f"{LFTS}/quickstart", f"{CMS}/quickstart-child")]  # fmt: skip
            return codes == [404, 404]

        await _until(gone)
        assert any(r.subresource == "status" and r.verb == "patch" for r in client.api.log)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def _events(client: Client, reason: str) -> list[Any]:
    _, doc = await client.req("GET", "/api/v1/namespaces/default/events")
    return [e for e in doc["items"] if e.get("reason") == reason]
