"""What a pod's processes see of the local kubelet: termination messages, the pod's own ports.

References: "Determine the Reason for Pod Failure" (https://kubernetes.io/docs/tasks/debug/
debug-application/determine-reason-pod-failure/: terminationMessagePath, default
/dev/termination-log, terminationMessagePolicy FallbackToLogsOnError uses the last chunk of
the log, at most 2048 bytes or 80 lines, when the file is empty and the container exited with
an error; a message is at most 4096 bytes, 12 KiB for all containers of a pod), the Pod
networking model (every pod has its own IP and network namespace, so two pods can serve the
same containerPort) and the Job docs (Job termination and cleanup, garbage collection).
"""

from __future__ import annotations

import sys
import textwrap
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from lora_operator.local.kubeapi import KubeError
from lora_operator.local.ports import free_port
from tests.local import test_runner
from tests.local.test_runner import (
    JOBS,
    PODS,
    Cluster,
    alive,
    condition,
    finished,
    make_job,
    running_pids,
    sleeper_job,
    until,
)

PY = sys.executable
cluster = test_runner.cluster  # the fixture: an API server and a pod runner


def container(name: str, script: str, *args: str, **fields: Any) -> dict[str, Any]:
    command = [PY, "-c", textwrap.dedent(script), *args]
    return {"name": name, "image": "ignored:latest", "command": command, **fields}


def pod(name: str, *containers: dict[str, Any], restart: str = "Never") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 2,
            "containers": list(containers),
        },
    }


async def terminal(cluster: Cluster, name: str) -> Any:
    async def check() -> Any:
        obj = await cluster.client.get(f"{PODS}/{name}")
        phase = ((obj or {}).get("status") or {}).get("phase")
        return obj if phase in ("Succeeded", "Failed") else None

    return await until(check)


def terminated(pod: Any) -> dict[str, Any]:
    return {c["name"]: c["state"]["terminated"] for c in pod["status"]["containerStatuses"]}


WRITE_ARG = """
    import sys
    path = sys.argv[sys.argv.index("--termination-log") + 1]
    open(path, "w").write("x" * 5000 + "done: 7 steps")
"""
WRITE_ENV = """
    import os
    print("not the message")
    open(os.environ["MSG"], "w").write("custom path")
"""
LINES = """
    import sys
    for i in range(int(sys.argv[1])):
        print(f"line {i:03d} " + "y" * int(sys.argv[2]))
    sys.exit(int(sys.argv[3]))
"""


async def test_termination_message_from_the_file(cluster: Cluster) -> None:
    writer = container("writer", WRITE_ARG, "--termination-log", "/dev/termination-log")
    custom = container(
        "custom",
        WRITE_ENV,
        terminationMessagePath="/var/run/lora/msg",
        env=[{"name": "MSG", "value": "/var/run/lora/msg"}],
    )
    quiet = container("quiet", "print('only a log line')")
    await cluster.client.create(PODS, pod("msgs", writer, custom, quiet))
    done = await terminal(cluster, "msgs")
    assert done["status"]["phase"] == "Succeeded"
    states = terminated(done)
    # the kubelet keeps the last 4096 bytes of the file (3 containers: 12 KiB / 3 >= 4096)
    assert states["writer"]["message"] == ("x" * 5000 + "done: 7 steps")[-4096:]
    assert states["custom"]["message"] == "custom path"
    assert "message" not in states["quiet"]  # nothing written: no message key
    assert all(s["exitCode"] == 0 and s["reason"] == "Completed" for s in states.values())


async def test_termination_message_falls_back_to_the_log_on_error(cluster: Cluster) -> None:
    fallback = {"terminationMessagePolicy": "FallbackToLogsOnError"}
    many_lines = container("lines", LINES, "100", "0", "3", **fallback)
    long_lines = container("long", LINES, "30", "100", "1", **fallback)
    succeeded = container("ok", LINES, "5", "0", "0", **fallback)
    file_wins = container(
        "file",
        "import sys; print('log'); open('/dev/termination-log', 'w').write('why'); sys.exit(2)",
        **fallback,
    )
    file_policy = container("plain", LINES, "5", "0", "3")  # File (default): logs not used
    pod_obj = pod("crash", many_lines, long_lines, succeeded, file_wins, file_policy)
    await cluster.client.create(PODS, pod_obj)
    done = await terminal(cluster, "crash")
    assert done["status"]["phase"] == "Failed"
    states = terminated(done)
    assert states["lines"]["exitCode"] == 3
    # the last 80 lines of the log
    assert states["lines"]["message"] == "".join(f"line {i:03d} \n" for i in range(20, 100))
    # at most 2048 bytes (5 containers: 12 KiB / 5 = 2457 bytes each, more than that)
    long_log = "".join(f"line {i:03d} " + "y" * 100 + "\n" for i in range(30))
    assert states["long"]["message"] == long_log[-2048:]
    assert states["file"]["message"] == "why"
    assert "message" not in states["ok"]  # exit code 0: the log is not used
    assert "message" not in states["plain"]
    assert states["plain"]["exitCode"] == 3


SERVE = """
    import os, runpy, sys
    open("whoami", "w").write(os.environ["POD_NAME"])
    sys.argv = ["http.server", sys.argv[1]]
    runpy.run_module("http.server", run_name="__main__")  # python -m http.server PORT
"""
OTHER = """
    import socket, sys
    declared, other = int(sys.argv[1]), int(sys.argv[2])
    wild = socket.create_server(("", other))  # not a declared port: stays on the wildcard
    explicit = socket.create_server(("127.0.0.1", declared))  # an explicit address
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", declared))  # UDP: not a TCP containerPort
    for name, sock in (("wild", wild), ("explicit", explicit), ("udp", udp)):
        print(name, *sock.getsockname(), flush=True)
"""


async def test_two_pods_serve_the_same_container_port(cluster: Cluster) -> None:
    port, other = free_port(), free_port()
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    for name in ("web-a", "web-b"):
        server = container(
            "main", SERVE, str(port), env=env, ports=[{"name": "http", "containerPort": port}]
        )
        await cluster.client.create(PODS, pod(name, server))
    ports = [{"containerPort": port, "protocol": "TCP"}]
    prober = container("main", OTHER, str(port), str(other), ports=ports)
    await cluster.client.create(PODS, pod("other", prober))

    async def running(name: str) -> Any:
        obj = await cluster.client.get(f"{PODS}/{name}")
        return obj if (obj or {}).get("status", {}).get("phase") == "Running" else None

    ips = [(await until(partial(running, n)))["status"]["podIP"] for n in ("web-a", "web-b")]
    assert ips[0] != ips[1]

    async def fetch(session: aiohttp.ClientSession, ip: str) -> tuple[int, str] | None:
        try:
            async with session.get(f"http://{ip}:{port}/whoami") as resp:
                return resp.status, await resp.text()
        except aiohttp.ClientError:
            return None  # not listening yet

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for ip, name in zip(ips, ("web-a", "web-b"), strict=True):
            assert await until(partial(fetch, session, ip)) == (200, name)
        for name in ("web-a", "web-b"):  # both still serving side by side
            assert await running(name)

    done = await terminal(cluster, "other")
    log = cluster.runner.log_path("default", "other", "main").read_text().splitlines()
    assert done["status"]["phase"] == "Succeeded", log
    assert log == [f"wild 0.0.0.0 {other}", f"explicit 127.0.0.1 {port}", f"udp 0.0.0.0 {port}"]


async def test_deleted_job_is_collected_and_its_name_reused(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.client.create(JOBS, sleeper_job("again", tmp_path))
    first = await cluster.job("again")
    old_uid = first["metadata"]["uid"]

    async def pods_of(uid: str) -> list[Any]:
        sel = f"?labelSelector=batch.kubernetes.io/controller-uid={uid}"
        return await cluster.client.list(PODS + sel)

    async def running_pod(uid: str) -> Any:
        pods = [p for p in await pods_of(uid) if p.get("status", {}).get("phase") == "Running"]
        return pods[0] if pods else None

    old_pod = await until(lambda: running_pod(old_uid))
    tree = await running_pids(tmp_path, old_pod["metadata"]["name"])
    assert all(alive(pid) for pid in tree)

    options = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
    await cluster.client.request("DELETE", f"{JOBS}/again", options)
    assert await cluster.job("again") is None  # the Job itself goes at once
    # ... and a new Job of the same name can be created right away
    await cluster.client.create(JOBS, make_job("again", "print('second run')"))
    new_uid = (await cluster.job("again"))["metadata"]["uid"]
    assert new_uid != old_uid

    # garbage collection removes the old pods and the kubelet kills their process trees
    async def old_gone() -> bool:
        return not await pods_of(old_uid) and not any(alive(pid) for pid in tree)

    await until(old_gone)
    done = await finished(cluster, "again")
    assert done["metadata"]["uid"] == new_uid
    assert condition(done, "Complete"), done["status"]
    (new_pod,) = await pods_of(new_uid)
    assert new_pod["status"]["phase"] == "Succeeded"
    assert new_pod["metadata"]["ownerReferences"][0]["uid"] == new_uid
    assert cluster.log(new_pod).strip() == "second run"
    try:
        await cluster.client.request("GET", f"{PODS}/{old_pod['metadata']['name']}")
        raise AssertionError("the old pod still exists")
    except KubeError as exc:
        assert exc.code == 404
