"""The local pod runner runs batch/v1 Indexed Jobs as the Job controller and kubelet would.

References: the Job docs (https://kubernetes.io/docs/concepts/workloads/controllers/job/:
Indexed completion mode, pod failure policy, backoffLimit, suspend, Job termination and
cleanup) and the Pod lifecycle page (phases, container states, termination grace period).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_operator.local import LocalApiServer
from lora_operator.local.apiserver import Fault, LoggedRequest
from lora_operator.local.kubeapi import KubeClient
from lora_operator.local.podrunner import PodRunner
from lora_operator.local.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = ROOT / ".venv" / "bin" / "kubectl"
JOBS = "/apis/batch/v1/namespaces/default/jobs"
PODS = "/api/v1/namespaces/default/pods"


@dataclass
class Cluster:
    api: LocalApiServer
    runner: PodRunner
    client: KubeClient

    async def job(self, name: str) -> Any:
        return await self.client.get(f"{JOBS}/{name}")

    async def pods(self, job: str) -> list[Any]:
        sel = f"?labelSelector=batch.kubernetes.io/job-name={job}"
        pods = await self.client.list(PODS + sel)
        return sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"])

    def log(self, pod: Any) -> str:
        return self.runner.log_path("default", pod["metadata"]["name"], "main").read_text()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with (
        LocalApiServer.running() as api,
        PodRunner.running(api.api_url, tmp_path / "state") as runner,
        KubeClient(api.api_url) as client,
    ):
        yield Cluster(api, runner, client)


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := await check():
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


def condition(obj: Any, ctype: str) -> Any:
    conds = (obj or {}).get("status", {}).get("conditions") or []
    return next((c for c in conds if c["type"] == ctype and c["status"] == "True"), None)


async def finished(cluster: Cluster, name: str) -> Any:
    async def check() -> Any:
        job = await cluster.job(name)
        return job if condition(job, "Complete") or condition(job, "Failed") else None

    return await until(check)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def make_job(name: str, script: str, completions: int = 1, **spec: Any) -> dict[str, Any]:
    """An Indexed Job shaped like the operator's (see builders/job.py), running `script`."""
    container = {
        "name": "main",
        "image": "ignored:latest",
        "command": [sys.executable, "-c", textwrap.dedent(script)],
        "env": spec.pop("env", []),
        "volumeMounts": spec.pop("mounts", []),
    }
    pod_spec = {
        "restartPolicy": "Never",
        "subdomain": f"{name}-workers",
        "terminationGracePeriodSeconds": 2,
        "containers": [container],
        "volumes": spec.pop("volumes", []),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "completionMode": "Indexed",
            "completions": completions,
            "parallelism": completions,
            "backoffLimit": 0,
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
            **spec,
        },
    }


# Pod 0 serves on its own pod IP; pod 1 builds the hostname of pod 0 at run time (resolved by
# the runner's Python hook) and also receives it in env (rewritten to the IP for any program).
TALK = """
    import os, socket, time
    index, port = int(os.environ["JOB_COMPLETION_INDEX"]), int(os.environ["PORT"])
    if index == 0:
        server = socket.create_server((os.environ["POD_IP"], port))
        conn, _ = server.accept()
        conn.sendall(b"pong:" + conn.recv(16))
        conn.close()
    else:
        host = os.environ["JOB"] + "-0." + os.environ["JOB"] + "-workers"
        deadline = time.time() + 15
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=1)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        sock.sendall(b"ping")
        print(sock.recv(16).decode(), "via", host, "peer", sock.getpeername()[0])
        print("MASTER_ADDR", os.environ["MASTER_ADDR"])
        print("self", socket.gethostbyname(os.environ["HOSTNAME"]) == os.environ["POD_IP"])
"""


async def test_indexed_job_pods_talk_over_their_hostnames(cluster: Cluster) -> None:
    port = free_port()
    env = [
        {"name": "PORT", "value": str(port)},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "JOB", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}},
        {"name": "MASTER_ADDR", "value": "talk-0.talk-workers.default.svc.cluster.local"},
    ]  # fmt: skip
    await cluster.client.create(JOBS, make_job("talk", TALK, completions=2, env=env))
    job = await finished(cluster, "talk")
    assert condition(job, "Complete")["reason"] == "CompletionsReached"
    status = job["status"]
    assert status["completedIndexes"] == "0,1"  # the Job controller's interval format
    assert (status["succeeded"], status["failed"], status["active"]) == (2, 0, 0)
    assert status["startTime"] and status["completionTime"]
    pod0, pod1 = sorted(await cluster.pods("talk"), key=lambda p: p["metadata"]["name"])
    ips = [pod0["status"]["podIP"], pod1["status"]["podIP"]]
    assert ips[0] != ips[1] and all(ip.startswith("127.") and ip != "127.0.0.1" for ip in ips)
    assert "pong:ping via talk-0.talk-workers peer " + ips[0] in cluster.log(pod1)
    assert f"MASTER_ADDR {ips[0]}" in cluster.log(pod1)
    assert "self True" in cluster.log(pod1)  # a pod resolves its own hostname to its IP
    # the runner's requests are told apart in the request log (e.g. when deriving RBAC)
    creates = cluster.api.requests_for("create", "pods")
    assert creates and {r.user_agent for r in creates} == {"lora-operator-local"}
    for index, pod in enumerate((pod0, pod1)):
        meta = pod["metadata"]
        assert meta["name"].startswith(f"talk-{index}-")
        assert meta["labels"]["batch.kubernetes.io/job-completion-index"] == str(index)
        assert meta["labels"]["batch.kubernetes.io/controller-uid"] == job["metadata"]["uid"]
        assert meta["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
        assert not meta.get("finalizers")  # job-tracking finalizer removed before Complete
        assert pod["spec"]["hostname"] == f"talk-{index}"
        assert pod["status"]["phase"] == "Succeeded"
        (container,) = pod["status"]["containerStatuses"]
        assert container["state"]["terminated"]["exitCode"] == 0
        assert container["restartCount"] == 0


ENV_SCRIPT = """
    import json, os, sys
    shm = os.environ["SHM"]
    open(os.path.join(shm, "probe"), "w").write("x")
    print(json.dumps({
        "index": os.environ["JOB_COMPLETION_INDEX"],
        "spec": open(sys.argv[1]).read(),
        "token": os.environ["TOKEN"],
        "pod": os.environ["POD_NAME"],
        "ns": os.environ["POD_NS"],
        "annotation": os.environ["INDEX_ANNOTATION"],
        "expanded": os.environ["EXPANDED"],
        "shm_is_dir": os.path.isdir(shm),
        "cwd_is_tmp": os.getcwd() == os.environ["TMPDIR"],
        "hostname": os.environ["HOSTNAME"],
    }))
"""


def field(path: str) -> dict[str, Any]:
    return {"fieldRef": {"fieldPath": path}}


async def test_env_configmap_secret_and_emptydir_reach_the_process(cluster: Cluster) -> None:
    config = {"metadata": {"name": "cfg"}, "data": {"spec.json": '{"r": 8}'}}
    await cluster.client.create("/api/v1/namespaces/default/configmaps", config)
    secret = {"metadata": {"name": "tok"}, "data": {"t": base64.b64encode(b"s3cret").decode()}}
    await cluster.client.create("/api/v1/namespaces/default/secrets", secret)
    env = [
        {"name": "SHM", "value": "/dev/shm"},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "t"}}},
        {"name": "POD_NAME", "valueFrom": field("metadata.name")},
        {"name": "POD_NS", "valueFrom": field("metadata.namespace")},
        {"name": "INDEX_ANNOTATION",
         "valueFrom": field("metadata.annotations['batch.kubernetes.io/job-completion-index']")},
        {"name": "EXPANDED", "value": "ns=$(POD_NS) literal=$$(POD_NS)"},
    ]  # fmt: skip
    job = make_job(
        "env",
        ENV_SCRIPT,
        env=env,
        volumes=[
            {"name": "spec", "configMap": {"name": "cfg"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            {"name": "tmp", "emptyDir": {}},
        ],
        mounts=[
            {"name": "spec", "mountPath": "/etc/lora-operator/spec", "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    )
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["args"] = ["/etc/lora-operator/spec/spec.json"]
    container["workingDir"] = "/tmp"
    await cluster.client.create(JOBS, job)
    assert condition(await finished(cluster, "env"), "Complete")
    (pod,) = await cluster.pods("env")
    seen = json.loads(cluster.log(pod).splitlines()[-1])
    assert seen == {
        "index": "0",
        "spec": '{"r": 8}',
        "token": "s3cret",
        "pod": pod["metadata"]["name"],
        "ns": "default",
        "annotation": "0",
        "expanded": "ns=default literal=$(POD_NS)",
        "shm_is_dir": True,
        "cwd_is_tmp": True,
        "hostname": "env-0",
    }
    # /dev/shm of the pod is a private directory, not the machine's
    assert not Path("/dev/shm/probe").exists()


async def test_fail_job_on_exit_code_is_not_retried(cluster: Cluster) -> None:
    job = make_job("health", "raise SystemExit(86)", backoffLimit=3)
    job["spec"]["podFailurePolicy"] = {"rules": [{"action": "FailJob", "onExitCodes": {
        "containerName": "main", "operator": "In", "values": [86]}}]}  # fmt: skip
    await cluster.client.create(JOBS, job)
    done = await finished(cluster, "health")
    failed = condition(done, "Failed")
    assert failed["reason"] == "PodFailurePolicy"
    assert "exit code 86" in failed["message"]
    await asyncio.sleep(0.3)  # give a (wrong) retry the chance to appear
    (pod,) = await cluster.pods("health")
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 86
    assert (await cluster.job("health"))["status"]["failed"] == 1


async def test_backoff_limit_retries_then_fails(cluster: Cluster) -> None:
    job = make_job("flaky", "import sys; print('attempt'); sys.exit(3)", backoffLimit=1)
    job["spec"]["podFailurePolicy"] = {"rules": [{"action": "FailJob", "onExitCodes": {
        "operator": "In", "values": [86]}}]}  # fmt: skip
    await cluster.client.create(JOBS, job)
    done = await finished(cluster, "flaky")
    assert condition(done, "Failed")["reason"] == "BackoffLimitExceeded"
    await asyncio.sleep(0.3)
    pods = await cluster.pods("flaky")
    assert len(pods) == 2  # one retry of index 0, as backoffLimit 1 allows
    assert [p["status"]["phase"] for p in pods] == ["Failed", "Failed"]
    assert all(cluster.log(p).strip() == "attempt" for p in pods)
    assert (await cluster.job("flaky"))["status"]["failed"] == 2


async def test_ignored_exit_code_is_retried_without_counting(
    cluster: Cluster, tmp_path: Path
) -> None:
    marker = tmp_path / "first-attempt-done"
    script = f"""
        import pathlib, sys
        marker = pathlib.Path({str(marker)!r})
        if not marker.exists():
            marker.touch()
            sys.exit(42)  # e.g. a preempted node: the policy says Ignore
    """
    job = make_job("preempted", script, backoffLimit=0)
    job["spec"]["podFailurePolicy"] = {"rules": [{"action": "Ignore", "onExitCodes": {
        "operator": "In", "values": [42]}}]}  # fmt: skip
    await cluster.client.create(JOBS, job)
    done = await finished(cluster, "preempted")
    assert condition(done, "Complete"), done["status"]
    assert (done["status"]["failed"], done["status"]["succeeded"]) == (0, 1)
    phases = sorted(p["status"]["phase"] for p in await cluster.pods("preempted"))
    assert phases == ["Failed", "Succeeded"]  # the ignored failure left its pod behind


async def test_counted_pods_survive_a_failed_status_write(cluster: Cluster) -> None:
    """As the real Job controller: a finished pod is listed in uncountedTerminatedPods, its
    finalizer goes, then the count and Complete are written. That last write answers 500:
    the next sync still counts the pod (from the list), once."""
    released = [False]

    def after_release(entry: LoggedRequest) -> bool:  # other requests may come in between
        what = (entry.verb, entry.resource, entry.subresource)
        if what == ("patch", "pods", None):  # the finalizer's removal (not a pod status)
            released[0] = True
        return released[0] and what == ("patch", "jobs", "status")

    fault = cluster.api.inject(Fault(after_release, status=500))
    await cluster.client.create(JOBS, make_job("count", "print('done')"))
    job = await finished(cluster, "count")
    assert fault.times == 0, "the fault fired"
    assert condition(job, "Complete"), job["status"]
    assert (job["status"]["succeeded"], job["status"]["failed"]) == (1, 0)
    assert not job["status"].get("uncountedTerminatedPods")
    (pod,) = await cluster.pods("count")
    assert not pod["metadata"].get("finalizers")


async def test_active_deadline(cluster: Cluster) -> None:
    job = make_job("slow", "import time; time.sleep(60)", activeDeadlineSeconds=1)
    await cluster.client.create(JOBS, job)
    done = await finished(cluster, "slow")
    assert condition(done, "Failed")["reason"] == "DeadlineExceeded"
    # the running pod was deleted by the Job controller; Failed shows once it is gone
    assert not await cluster.pods("slow")
    assert done["status"]["active"] == 0


# A pod that records its PID and that of a child process (a process tree), then sleeps.
SLEEPER = """
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    name = os.environ["POD_NAME"]
    with open(os.path.join(os.environ["PIDS"], name + ".tmp"), "w") as fh:
        fh.write(f"{os.getpid()} {child.pid}")
    print("sleeping in", name, flush=True)  # before the PID file appears
    os.rename(os.path.join(os.environ["PIDS"], name + ".tmp"),
              os.path.join(os.environ["PIDS"], name))
    time.sleep(120)
"""


def sleeper_job(name: str, pids: Path, **spec: Any) -> dict[str, Any]:
    env = [
        {"name": "PIDS", "value": str(pids)},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    return make_job(name, SLEEPER, env=env, **spec)


async def running_pids(pids: Path, pod: str) -> list[int]:
    async def check() -> list[int] | None:
        file = pids / pod
        return [int(p) for p in file.read_text().split()] if file.exists() else None

    result: list[int] = await until(check)
    return result


async def test_suspend_kills_pods_resume_restarts_delete_kills(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.client.create(JOBS, sleeper_job("nap", tmp_path, backoffLimit=0))

    async def one_running() -> Any:
        pods = [
            p for p in await cluster.pods("nap") if p.get("status", {}).get("phase") == "Running"
        ]
        return pods[0] if pods else None

    first = await until(one_running)
    tree = await running_pids(tmp_path, first["metadata"]["name"])
    assert all(alive(pid) for pid in tree)
    assert (await cluster.job("nap"))["status"]["active"] == 1

    await cluster.client.patch(f"{JOBS}/nap", {"spec": {"suspend": True}})
    job = await until(lambda: _with(cluster, "nap", "Suspended"))
    assert condition(job, "Suspended")["reason"] == "JobSuspended"
    await until(lambda: _async(not any(alive(pid) for pid in tree)), timeout=5)
    await until(lambda: _async_pods_gone(cluster, "nap"))
    job = await cluster.job("nap")
    assert job["status"]["active"] == 0 and job["status"]["failed"] == 0  # not a failure

    await cluster.client.patch(f"{JOBS}/nap", {"spec": {"suspend": False}})
    second = await until(one_running)
    assert second["metadata"]["name"] != first["metadata"]["name"]
    tree = await running_pids(tmp_path, second["metadata"]["name"])
    assert all(alive(pid) for pid in tree)
    job = await cluster.job("nap")
    suspended = next(c for c in job["status"]["conditions"] if c["type"] == "Suspended")
    assert (suspended["status"], suspended["reason"]) == ("False", "JobResumed")

    # deleting the Job: garbage collection deletes its pods, the kubelet kills their trees
    await cluster.client.delete(f"{JOBS}/nap")
    await until(lambda: _async(not any(alive(pid) for pid in tree)), timeout=5)
    await until(lambda: _async_pods_gone(cluster, "nap"))


async def test_deleting_a_pod_kills_it_and_counts_as_a_failure(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.client.create(JOBS, sleeper_job("victim", tmp_path, backoffLimit=1))
    pod = await until(lambda: _running_pod(cluster, "victim"))
    tree = await running_pids(tmp_path, pod["metadata"]["name"])
    await cluster.client.delete(f"{PODS}/{pod['metadata']['name']}")
    await until(lambda: _async(not any(alive(pid) for pid in tree)), timeout=5)
    # the deleted pod counts against backoffLimit; index 0 gets a new pod
    replacement = await until(lambda: _running_pod(cluster, "victim", not_named=pod))
    assert replacement["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "0"
    assert (await cluster.job("victim"))["status"]["failed"] == 1
    await running_pids(tmp_path, replacement["metadata"]["name"])


async def _running_pod(cluster: Cluster, job: str, not_named: Any = None) -> Any:
    for pod in await cluster.pods(job):
        if pod.get("status", {}).get("phase") == "Running" and (
            not_named is None or pod["metadata"]["name"] != not_named["metadata"]["name"]
        ):
            return pod
    return None


async def _with(cluster: Cluster, name: str, ctype: str) -> Any:
    job = await cluster.job(name)
    return job if condition(job, ctype) else None


async def _async(value: bool) -> bool:
    return value


async def _async_pods_gone(cluster: Cluster, job: str) -> bool:
    return not await cluster.pods(job)


def table(text: str) -> list[dict[str, str]]:
    """kubectl's table output as rows by column name (cells without spaces)."""
    header, *rows = text.splitlines()
    return [dict(zip(header.split(), row.split(), strict=True)) for row in rows]


# --- lora-operator local-api -------------------------------------------------------------------
def test_local_api_command_serves_kubectl_and_stops_cleanly(tmp_path: Path) -> None:
    if not KUBECTL.exists():
        pytest.skip("kubectl missing: bash scripts/install-tools.sh .venv")
    kubeconfig, pids = tmp_path / "kubeconfig", tmp_path / "pids"
    pids.mkdir()
    cmd = [sys.executable, "-m", "lora_operator.cli", "local-api", "--port", str(free_port()),
           "--kubeconfig", str(kubeconfig), "--state-dir", str(tmp_path / "state")]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert server.stdout is not None
        lines: list[str] = []
        while not lines or "Ctrl-C" not in lines[-1]:
            line = server.stdout.readline()
            assert line, f"local-api exited: {lines}"
            lines.append(line)
        exports = dict(line.split()[1].split("=", 1) for line in lines if line.startswith("export"))
        assert exports["KUBECONFIG"] == str(kubeconfig)
        env = {**os.environ, **exports}

        def kubectl(*args: str, stdin: str | None = None) -> str:
            out = subprocess.run([str(KUBECTL), *args], env=env, input=stdin, text=True,
                                 capture_output=True, timeout=30)  # fmt: skip
            assert out.returncode == 0, out.stderr
            return out.stdout

        job = yaml.safe_dump(sleeper_job("cli", pids))
        assert "created" in kubectl("apply", "--validate=false", "-f", "-", stdin=job)
        kubectl("wait", "--for=condition=Ready", "pod", "-l", "batch.kubernetes.io/job-name=cli",
                "--timeout=20s")  # fmt: skip
        jobs = table(kubectl("get", "jobs"))
        assert [(j["NAME"], j["STATUS"], j["COMPLETIONS"]) for j in jobs] == [
            ("cli", "Running", "0/1")
        ]
        (pod,) = table(kubectl("get", "pods", "-o", "wide"))
        assert pod["NAME"].startswith("cli-0-")
        assert (pod["READY"], pod["STATUS"], pod["RESTARTS"]) == ("1/1", "Running", "0")
        assert pod["IP"].startswith("127.") and pod["IP"] != "127.0.0.1"
        tree = asyncio.run(running_pids(pids, pod["NAME"]))
        assert kubectl("logs", pod["NAME"]) == f"sleeping in {pod['NAME']}\n"
        assert all(alive(pid) for pid in tree)
        server.send_signal(signal.SIGINT)
        assert server.wait(15) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in tree)  # Ctrl-C leaves no process behind


# The operator's own Job (builders/job.py) with the trainer command swapped for a script that
# checks what `lora-train launch` relies on: the spec file, the rendezvous address and env.
RENDEZVOUS = """
    import json, os, socket, sys, time
    spec = json.load(open(sys.argv[sys.argv.index("--spec") + 1]))
    addr, port = os.environ["LORA_MASTER_ADDR"], int(os.environ["LORA_MASTER_PORT"])
    if os.environ["JOB_COMPLETION_INDEX"] == "0":
        conn, _ = socket.create_server((addr, port)).accept()
        print("rank 1 joined:", conn.recv(64).decode())
    else:
        for _ in range(300):
            try:
                socket.create_connection((addr, port), timeout=1).sendall(b"hello")
                break
            except OSError:
                time.sleep(0.05)
        print("joined", addr, "nodes", os.environ["LORA_NNODES"], "r", spec["spec"]["lora"]["r"])
"""


async def test_the_operators_indexed_job_runs_locally(
    cluster: Cluster, make_body: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    from lora_operator.builders import Owner, build_indexed_job, build_spec_configmap
    from lora_operator.validation import validate_body

    shared = {"source": "pvc://data/train.jsonl", "evalSource": "pvc://data/eval.jsonl"}
    patch = {"distributed": {"nodes": 2}, "dataset": shared, "output": {"uri": "pvc://out/run"}}
    result = validate_body(make_body({"spec": patch}))
    assert result.resource is not None, result.problems
    owner = Owner("quickstart", "default", "uid-of-the-lorafinetune")
    children = [build_spec_configmap(result.resource.spec, owner),
                build_indexed_job(result.resource.spec, owner, "ignored:0.1")]  # fmt: skip
    for child in children:
        child["metadata"].pop("ownerReferences")  # no LoRAFineTune here for GC to follow
    configmap, job = children
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["lora-train", "launch"]
    container["command"] = [sys.executable, "-c", textwrap.dedent(RENDEZVOUS),
                            *container["command"][2:]]  # fmt: skip
    container["name"] = "main"
    await cluster.client.create("/api/v1/namespaces/default/configmaps", configmap)
    await cluster.client.create(JOBS, job)
    done = await finished(cluster, "quickstart")
    pod0, pod1 = sorted(await cluster.pods("quickstart"), key=lambda p: p["metadata"]["name"])
    assert condition(done, "Complete"), (cluster.log(pod0), cluster.log(pod1))
    pod0, pod1 = sorted(await cluster.pods("quickstart"), key=lambda p: p["metadata"]["name"])
    assert cluster.log(pod0).strip() == "rank 1 joined: hello"
    assert cluster.log(pod1).strip() == f"joined {pod0['status']['podIP']} nodes 2 r 16"


def test_mount_paths_are_rewritten_but_host_paths_below_them_are_not(tmp_path: Path) -> None:
    """A pod with an emptyDir at /tmp whose interpreter lives under /tmp (a checkout there):
    the interpreter's path must survive, the pod's own /tmp paths must not."""
    from lora_operator.local.podproc import Network, make_rewriter

    assert str(tmp_path).startswith("/tmp/")
    interpreter = tmp_path / "venv" / "bin" / "python"
    mounts = {"/tmp": "/vol/tmp", "/etc/lora-operator/spec": "/vol/spec"}
    rewrite = make_rewriter(mounts, "default", None, Network(tmp_path / "hosts"))
    assert rewrite(str(interpreter)) == str(interpreter)
    assert rewrite("/tmp") == "/vol/tmp"
    assert rewrite("--out=/tmp/lora-not-on-this-host/x") == "--out=/vol/tmp/lora-not-on-this-host/x"
    assert rewrite("/etc/lora-operator/spec/spec.json") == "/vol/spec/spec.json"
    assert rewrite("/tmpfoo /etc/lora-operator/specs") == "/tmpfoo /etc/lora-operator/specs"
