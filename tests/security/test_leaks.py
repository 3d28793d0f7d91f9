"""A planted Secret never leaks; the trainer's /metrics and /health show nothing outside the job.

One short quickstart (pre-flight on, 10 steps) on the local cluster: a Secret holding a unique
token reaches the trainer through spec.pod.env[].secretKeyRef, the tiny model and the output
directory live under distinctive directory names. While it runs, the trainer's /metrics and
/health are scraped and the environment of each pod's process is read; when it Succeeded,
every output is collected: every object (and every version of it) the emulated API holds,
kubectl's views, the operator's metrics and log records, every pod log and file the pod
runner wrote, every file of the run's output directory after `lora-operator report`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lora_operator.api import constants as c
from lora_operator.cli import main as cli_main
from tests.e2e.cluster import KUBECTL, NS, PODS, ROOT, Cluster, local_cluster, quickstart

pytestmark = [pytest.mark.slow, pytest.mark.training]

NAME = "quickstart"
SECRET = "leak-token"
ENV_NAME = "LEAKCHECK_TOKEN"
LISTS = {  # cluster-wide lists, as `kubectl get -A` reads them
    "lorafinetunes": f"/apis/{c.API_VERSION}/{c.PLURAL}",
    "configmaps": "/api/v1/configmaps",
    "services": "/api/v1/services",
    "jobs": "/apis/batch/v1/jobs",
    "pods": "/api/v1/pods",
    "events": "/api/v1/events",
}


@dataclass
class Run:
    """Everything the run produced, by where it came from."""

    token: str
    model_tag: str  # a directory name only the model's path contains
    out_tag: str  # a directory name only the output directory's path contains
    out: Path
    model_source: str
    phase: str = ""
    pod_env: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # role -> spec env
    environ_has_token: dict[str, bool] = field(default_factory=dict)  # pod -> seen in a process
    scrapes: dict[str, str] = field(default_factory=dict)  # /metrics, /health -> last body
    outputs: dict[str, bytes] = field(default_factory=dict)  # where -> content
    secret: bytes = b""  # the Secret as the API holds it (the control: the grep finds it)

    @property
    def needles(self) -> dict[str, bytes]:
        raw = self.token.encode()
        return {
            "token": raw,
            "base64(token)": base64.b64encode(raw),
            "base64(token) unpadded": base64.b64encode(raw).rstrip(b"="),
            "urlsafe base64(token)": base64.urlsafe_b64encode(raw).rstrip(b"="),
            "token uuid": self.token.removeprefix("s3cr3t-").encode(),
        }


class _Records(logging.Handler):
    """Every log record of every thread, formatted with its arguments and traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001 (a record that cannot format is still a record)
            self.lines.append(f"{record.msg!r} {record.args!r}")


@contextlib.contextmanager
def _all_logs() -> Iterator[_Records]:
    root, handler = logging.getLogger(), _Records()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (pod IP, local)
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""
    except OSError:
        return 0, ""


def _environ_has(pid: int, needle: bytes) -> bool:
    """Whether PID or one of its descendants runs with NEEDLE in its environment."""
    todo, seen = [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{p}/environ").read_bytes().split(b"\0"):
                return True
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(x) for x in (task / "children").read_text().split()]
    return False


def _files(root: Path, prefix: str) -> dict[str, bytes]:
    return {
        f"{prefix}/{p.relative_to(root)}": p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


async def _watch(cluster: Cluster, run: Run, deadline: float) -> None:
    """Until the job ends: scrape rank 0, read each pod's process environment."""
    needle = f"{ENV_NAME}={run.token}".encode()
    sel = f"?labelSelector={c.LABEL_JOB_NAME}={NAME}"
    while time.monotonic() < deadline:
        lft = await cluster.lft(NAME)
        run.phase = ((lft or {}).get("status") or {}).get("phase", "")
        if run.phase in (c.PHASE_SUCCEEDED, c.PHASE_FAILED):
            return
        pids = cluster.runner.pids()
        for pod in await cluster.client.list(PODS + sel):
            name, role = pod["metadata"]["name"], pod["metadata"]["labels"].get(c.LABEL_ROLE)
            run.pod_env.setdefault(role, pod["spec"]["containers"][0].get("env") or [])
            for pid in pids.get(f"{NS}/{name}") or []:
                if await asyncio.to_thread(_environ_has, pid, needle):
                    run.environ_has_token[name] = True
            ip = (pod.get("status") or {}).get("podIP")
            if role == "trainer" and ip and pod["status"].get("phase") == "Running":
                for path in ("/metrics", "/health"):
                    code, text = await asyncio.to_thread(
                        _http_get, f"http://{ip}:{c.DEFAULT_METRICS_PORT}{path}"
                    )
                    if code == 200 and text:
                        run.scrapes[path] = text
        await asyncio.sleep(0.4)


async def _collect(cluster: Cluster, run: Run, state: Path) -> None:
    out = run.outputs
    secret_key = ("", "secrets", NS, SECRET)
    for key, obj in cluster.api.store.objects.items():
        if key == secret_key:
            run.secret = json.dumps(obj).encode()
        else:
            out[f"api object {'/'.join(key)}"] = json.dumps(obj).encode()
    for n, ev in enumerate(cluster.api.store.history):  # every version ever written
        if (ev.group, ev.plural) != ("", "secrets"):
            out[f"api history #{n} {ev.plural}"] = json.dumps(ev.obj).encode()
    for kind, url in LISTS.items():
        out[f"api list {kind}"] = json.dumps(await cluster.client.list(url)).encode()
    for args in (
        ("get", "lft", "-A", "-o", "yaml"),
        ("describe", "lft", NAME),
        ("get", "events", "-A", "-o", "yaml"),
        ("get", "configmaps,jobs,pods,services", "-A", "-o", "yaml"),
        ("describe", "pods"),
        ("logs", f"job/{NAME}"),
        ("logs", f"job/{NAME}-preflight"),
    ):
        out[f"kubectl {' '.join(args)}"] = (await cluster.kubectl(*args, check=False)).encode()
    out["operator metrics"] = cluster.metrics.render()
    # every file the pod runner wrote (pod logs, termination logs, emptyDirs), the run's output
    out.update(_files(state, "runner state"))
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = await asyncio.to_thread(cli_main, ["report", str(run.out)])
    assert code == 0, stderr.getvalue()
    out["lora-operator report output"] = (stdout.getvalue() + stderr.getvalue()).encode()
    out.update(_files(run.out, "output dir"))
    for path, body in run.scrapes.items():
        out[f"trainer {path}"] = body.encode()


async def _run(tmp: Path, tiny: Path) -> Run:
    model_tag, out_tag = f"leakcheck-model-{uuid.uuid4().hex}", f"leakcheck-out-{uuid.uuid4().hex}"
    assets = tmp / model_tag / "tiny"
    shutil.copytree(tiny / "model", assets / "model")
    shutil.copytree(tiny / "data", assets / "data")
    out = tmp / out_tag / "run"
    run = Run(f"s3cr3t-{uuid.uuid4()}", model_tag, out_tag, out, f"file://{assets}/model")
    patch = {
        "training": {"maxSteps": 10, "warmup": {"steps": 2}},
        "health": {"preflight": {"enabled": True}},
        "pod": {"env": [{"name": ENV_NAME, "secretKeyRef": {"name": SECRET, "key": "token"}}]},
    }
    manifest = quickstart(assets, out, patch)
    with _all_logs() as records:
        async with local_cluster(tmp) as cluster:
            await cluster.client.create(
                f"/api/v1/namespaces/{NS}/secrets",
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": SECRET, "namespace": NS},
                    "type": "Opaque",
                    "data": {"token": base64.b64encode(run.token.encode()).decode()},
                },
            )
            await cluster.kubectl("apply", "--validate=false", "-f", "-", stdin=manifest)
            await _watch(cluster, run, time.monotonic() + 150)
            await _collect(cluster, run, tmp / "state")
    run.outputs["log records"] = "\n".join(records.lines).encode()
    return run


@pytest.fixture(scope="module")
def run(tiny_assets: Any, tmp_path_factory: pytest.TempPathFactory) -> Run:
    if not KUBECTL.exists():
        pytest.skip("kubectl missing: bash scripts/install-tools.sh .venv")
    tiny = Path(tiny_assets.model_dir).parent
    return asyncio.run(_run(tmp_path_factory.mktemp("security"), tiny))


def test_the_planted_secret_reached_the_trainer_through_a_secret_key_ref(run: Run) -> None:
    """Not vacuous: the job ran, the pods reference the Secret (never a literal value) and the
    processes of both pods saw it."""
    assert run.phase == c.PHASE_SUCCEEDED
    assert set(run.pod_env) == {"preflight", "trainer"}
    for role, env in run.pod_env.items():
        (var,) = [v for v in env if v["name"] == ENV_NAME]
        assert var == {"name": ENV_NAME, "valueFrom": {"secretKeyRef": {"name": SECRET,
                       "key": "token"}}}, role  # fmt: skip
    assert len(run.environ_has_token) == 2, run.environ_has_token  # pre-flight and rank 0
    assert run.needles["base64(token)"] in run.secret  # the search below would find it


def test_the_planted_secret_appears_in_no_output(run: Run) -> None:
    wheres = {"api object", "api history", "api list", "kubectl", "operator metrics",
              "runner state", "output dir", "trainer /metrics", "trainer /health",
              "log records", "lora-operator report output"}  # fmt: skip
    assert {w for w in wheres if any(k.startswith(w) for k in run.outputs)} == wheres
    assert any(k.endswith("report.html") for k in run.outputs)
    assert any(k.endswith("trace.jsonl") for k in run.outputs)
    assert any(k.endswith("summary.json") for k in run.outputs)
    assert any(k.endswith(".log") for k in run.outputs if k.startswith("runner state"))
    hits = [
        f"{label} in {where}"
        for where, content in run.outputs.items()
        for label, needle in run.needles.items()
        if needle in content
    ]
    assert hits == []


def _outside_values(run: Run) -> dict[str, str]:
    """Paths and values of this machine and test that are not part of the job's spec."""
    return {
        "output dir": run.out_tag,
        "repository": str(ROOT),
        "python prefix": sys.prefix,
        "home": os.path.expanduser("~"),
        "runner state dir": str(run.out.parents[1] / "state"),
        "secret": run.token,
    }


def test_trainer_metrics_and_health_show_nothing_outside_the_job(run: Run) -> None:
    assert set(run.scrapes) == {"/metrics", "/health"}
    assert "lora_trainer_run_info" in run.scrapes["/metrics"]
    json.loads(run.scrapes["/health"])
    for path, body in run.scrapes.items():
        for what, value in _outside_values(run).items():
            assert value not in body, (path, what, value)
        # the model's directory may show only as the run_info model label (the spec's URI)
        lines = [ln for ln in body.splitlines() if run.model_tag in ln]
        assert all(ln.startswith("lora_trainer_run_info{") for ln in lines), (path, lines)
        label = run.model_source.rstrip("/").rsplit("/", 1)[-1]  # the last path component
        assert all(f'model="{label}"' in ln for ln in lines), (path, lines)
    operator_metrics = run.outputs["operator metrics"].decode()
    for what, value in {**_outside_values(run), "model dir": run.model_tag}.items():
        assert value not in operator_metrics, (what, value)


def test_trainer_metrics_show_no_local_model_path(run: Run) -> None:
    assert run.model_tag not in run.scrapes["/metrics"]
