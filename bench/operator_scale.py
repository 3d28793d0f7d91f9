"""The operator at scale: N concurrent LoRAFineTunes against the emulated Kubernetes API.

One load process, pinned to core 0 (`--load-cpu`), holds:
- the emulated API server (`lora_operator.local.LocalApiServer`) with the CRD;
- the local Job controller (`lora_operator.local.jobs.JobController`), which makes one pod per
  Job, and a fake kubelet (below) that marks each new pod Running + Ready with its own
  loopback address 127.X.Y.Z (no training processes: the pod runner's kubelet would run one);
- ONE synthetic `/health` endpoint made with the trainer's own code
  (`lora_trainer.telemetry.exporter.serve` + `HealthMonitor`, fed one synthetic training
  record per second so the step advances and Stalled never fires), bound to 0.0.0.0 on
  spec.monitoring.port: every pod IP in 127.0.0.0/8 reaches it.

The operator runs as `lora-operator run` in its own process pinned to core 1
(`--operator-cpu`); only that process is measured: CPU seconds (utime + stime, children
included, from /proc/PID/stat) over wall time in a steady window, RSS (VmRSS, VmHWM), and
reconcile latency p50/p99 from the deltas of its `lora_operator_reconcile_duration_seconds`
histogram over the window (linear interpolation within buckets, as histogram_quantile).
The ramp (creation -> status.phase Running) is timed per job from a watch on LoRAFineTunes.

    .venv/bin/python bench/operator_scale.py --jobs 1000 --interval 30 --window 120 \
        --out bench/results/operator_scale.json
    .venv/bin/python bench/operator_scale.py --jobs 20 --window 40 --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from lora_operator.api import constants as c
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.local import LocalApiServer
from lora_operator.local.jobs import JOBS, PODS, JobController
from lora_operator.local.kubeapi import KubeClient, KubeError, path, watch_forever
from lora_operator.local.kubeconfig import kubeconfig
from lora_operator.local.ports import free_port
from lora_operator.local.store import now_iso

ROOT = Path(__file__).resolve().parents[1]
NS = "default"
LFTS = f"/apis/{c.API_VERSION}/namespaces/{NS}/{c.PLURAL}"
CRD = ROOT / "crds" / "lorafinetunes.lora-operator.dev.yaml"
TEMPLATE = ROOT / "examples" / "quickstart.yaml"
HIST = "lora_operator_reconcile_duration_seconds"
GOALS = {"p99_ms": 100.0, "cpu_cores": 1.0, "rss_mib": 512.0}


# --- the load: template, fake kubelet, synthetic /health ------------------------------------
def template(health_port: int) -> dict[str, Any]:
    body = yaml.safe_load(TEMPLATE.read_text())
    spec = body["spec"]
    spec["health"]["preflight"] = {"enabled": False}  # else the operator waits for a pod
    spec["monitoring"]["port"] = health_port
    spec["training"]["maxSteps"] = 1_000_000  # the synthetic run never ends in the window
    return body


def lft(base: dict[str, Any], i: int) -> dict[str, Any]:
    body = copy.deepcopy(base)
    body["metadata"] = {"name": f"lft-{i:04d}", "namespace": NS}
    body["spec"]["output"]["uri"] = f"file:///tmp/lora-operator/runs/lft-{i:04d}"
    return body


def pod_ip(n: int) -> str:
    """127.X.Y.Z for the n-th pod (n >= 0), never 127.0.0.1."""
    n += 256  # skip 127.0.0.x
    return f"127.{(n >> 16) & 255}.{(n >> 8) & 255}.{(n & 255) or 1}"


def running_status(ip: str) -> dict[str, Any]:
    now = now_iso()
    conds = [
        {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": now}
        for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady",
                  "PodScheduled")
    ]  # fmt: skip
    return {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "startTime": now,
        "conditions": conds,
    }


async def cluster_loop(client: KubeClient, wake: asyncio.Event, resync: float) -> None:
    """The Job controller plus a fake kubelet: every new pod -> Running, Ready, its own IP."""
    jobs, handled = JobController(client), set()
    while True:
        wake.clear()
        try:
            await jobs.sync()
            for pod in await client.list(PODS):
                meta, status = pod["metadata"], pod.get("status") or {}
                if meta["uid"] in handled or meta.get("deletionTimestamp"):
                    continue
                if status.get("phase") in ("Running", "Succeeded", "Failed"):
                    handled.add(meta["uid"])
                    continue
                url = path("v1", "pods", meta["namespace"], meta["name"]) + "/status"
                await client.patch(url, {"status": running_status(pod_ip(len(handled)))})
                handled.add(meta["uid"])
        except (KubeError, OSError) as exc:
            print(f"load: cluster loop: {exc}", file=sys.stderr)
        await asyncio.sleep(0.2)  # coalesce a burst of watch events into one pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), resync)


class SyntheticHealth:
    """The trainer's /health server (exporter.serve + HealthMonitor) on synthetic records."""

    def __init__(self, spec: dict[str, Any], port: int) -> None:
        from lora_trainer.health_monitor import HealthMonitor
        from lora_trainer.telemetry.exporter import serve

        total = int(spec["training"]["maxSteps"])
        self.monitor = HealthMonitor(LoRAFineTuneSpec.model_validate(spec), total)
        self.step = 0
        self._stop = threading.Event()
        self.feed()
        self.server = serve(port, CollectorRegistry(), self.monitor)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def feed(self) -> None:
        self.step += 1
        s = self.step
        self.monitor.observe({
            "schema": 1, "step": s, "epoch": s / 1000, "lr": 1e-3, "loss": 2.0 / (1 + s / 500),
            "grad_norm": 1.0, "tokens": 4096 * s, "step_time": 1.0,
        })  # fmt: skip

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.feed()

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()


API_PROBE = """
import json, sys, time, urllib.request
url, until, xs = sys.argv[1], time.monotonic() + float(sys.argv[2]) - 2, []
while time.monotonic() < until:
    t0 = time.perf_counter()
    urllib.request.urlopen(url, timeout=30).read()
    xs.append(1000 * (time.perf_counter() - t0))
    time.sleep(0.2)
xs.sort()
q = lambda f: round(xs[min(len(xs) - 1, int(f * len(xs)))], 2) if xs else None
print(json.dumps({"api_get_n": len(xs), "api_get_p50_ms": q(0.5), "api_get_p99_ms": q(0.99)}))
"""


# --- measuring the operator -------------------------------------------------------------------
def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def scrape(port: int) -> dict[str, Any]:
    """Histogram buckets (le -> cumulative), sum, count; jobs per phase; read errors."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:  # noqa: S310
        text = resp.read().decode()
    out: dict[str, Any] = {"buckets": {}, "sum": 0.0, "count": 0.0, "jobs": {}, "errors": {}}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == f"{HIST}_bucket":
                out["buckets"][float(s.labels["le"])] = s.value
            elif s.name == f"{HIST}_sum":
                out["sum"] = s.value
            elif s.name == f"{HIST}_count":
                out["count"] = s.value
            elif s.name == "lora_operator_jobs":
                out["jobs"][s.labels["phase"]] = int(s.value)
            elif s.name == "lora_operator_health_read_errors_total":
                out["errors"][s.labels["kind"]] = int(s.value)
    return out


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """histogram_quantile: linear interpolation inside the bucket holding the q-th rank."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if le == float("inf"):
                return lower  # beyond the last finite bucket: its bound, a lower limit
            inside = buckets[le] - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, buckets[le]
    return lower


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the run ------------------------------------------------------------------------------------
class Ramp:
    """Per job: created, first seen Running, first seen with status.health.lastCheckTime."""

    def __init__(self) -> None:
        self.created: dict[str, float] = {}
        self.running: dict[str, float] = {}
        self.checked: dict[str, float] = {}
        self.changed = asyncio.Event()

    def see(self, obj: dict[str, Any]) -> None:
        name, status, now = obj["metadata"]["name"], obj.get("status") or {}, time.monotonic()
        if status.get("phase") == c.PHASE_RUNNING and name not in self.running:
            self.running[name] = now
            self.changed.set()
        if (status.get("health") or {}).get("lastCheckTime") and name not in self.checked:
            self.checked[name] = now
            self.changed.set()

    async def watch(self, client: KubeClient) -> None:
        while True:
            try:
                for obj in await client.list(LFTS):  # catch up after a reconnect
                    self.see(obj)
                async for event in client.watch(LFTS, timeout=3600):
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self.see(event["object"])
            except (KubeError, OSError, json.JSONDecodeError) as exc:
                print(f"load: watch: {exc}", file=sys.stderr)
                await asyncio.sleep(0.5)


async def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await asyncio.to_thread(urllib.request.urlopen, url, timeout=2)  # noqa: S310
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                  if ln.startswith("model name")), platform.processor())  # fmt: skip
    mem = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in ln)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(int(mem.split()[1]) / 2**20, 1),
        "kernel": platform.release(),
    }


def versions() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("kopf", "kubernetes", "aiohttp", "prometheus-client", "lora-operator"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    out["git_commit"] = git("rev-parse", "HEAD").strip()
    dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "operator").splitlines()]
    out["operator_tree_dirty"] = dirty  # uncommitted operator changes the run included
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = template(args.health_port)
    health = SyntheticHealth(base["spec"], args.health_port)
    work = Path(tempfile.mkdtemp(prefix="operator-scale-"))
    wake = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    proc: subprocess.Popen[bytes] | None = None
    async with LocalApiServer.running() as api, KubeClient(api.api_url) as client:
        try:
            config = work / "kubeconfig"
            config.write_text(yaml.safe_dump(kubeconfig(api.api_url)))
            crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
            await client.create(crds, yaml.safe_load(CRD.read_text()))
            tasks += [
                asyncio.create_task(watch_forever(client, JOBS, wake)),
                asyncio.create_task(watch_forever(client, PODS, wake)),
                asyncio.create_task(cluster_loop(client, wake, args.resync)),
            ]
            ramp = Ramp()
            tasks.append(asyncio.create_task(ramp.watch(client)))

            metrics_port = free_port()
            cmd = [sys.executable, "-m", "lora_operator.cli", "run", "--standalone",
                   "--namespace", NS, "--kubeconfig", str(config),
                   "--health-interval", str(args.interval),
                   "--metrics-port", str(metrics_port)]  # fmt: skip
            log = (work / "operator.log").open("wb")
            cpu = args.operator_cpu
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work,
                preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))  # fmt: skip
            await wait_http(f"http://127.0.0.1:{metrics_port}/readyz", 60)
            print(f"operator pid {proc.pid} ready on core {cpu}", flush=True)
            idle = proc_status(proc.pid)

            # ramp: create every LoRAFineTune concurrently (at most --create-concurrency)
            sem = asyncio.Semaphore(args.create_concurrency)

            async def create(i: int) -> None:
                body = lft(base, i)
                async with sem:
                    ramp.created[body["metadata"]["name"]] = time.monotonic()
                    await client.create(LFTS, body)

            t0 = time.monotonic()
            await asyncio.gather(*(create(i) for i in range(args.jobs)))
            created_s = time.monotonic() - t0
            print(f"created {args.jobs} LoRAFineTunes in {created_s:.1f} s", flush=True)

            deadline = t0 + args.ramp_timeout
            while time.monotonic() < deadline and (
                len(ramp.running) < args.jobs or len(ramp.checked) < args.jobs
            ):
                ramp.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ramp.changed.wait(), 5)
                print(f"  t={time.monotonic() - t0:5.0f} s running {len(ramp.running)} "
                      f"health read {len(ramp.checked)}", flush=True)  # fmt: skip
            all_running = len(ramp.running) == args.jobs
            all_checked = len(ramp.checked) == args.jobs
            ramp_end = time.monotonic()
            after_ramp = proc_status(proc.pid)

            # steady window
            requests0 = len(api.log)
            probe = subprocess.Popen(
                [sys.executable, "-c", API_PROBE, f"{api.api_url}{LFTS}/lft-0000",
                 str(args.window)], stdout=subprocess.PIPE,
                preexec_fn=lambda: os.sched_setaffinity(0, {args.probe_cpu}))  # fmt: skip
            load0 = proc_cpu_seconds(os.getpid())
            m0, cpu0, w0 = scrape(metrics_port), proc_cpu_seconds(proc.pid), time.monotonic()
            samples = []
            while time.monotonic() - w0 < args.window:
                await asyncio.sleep(min(5.0, args.window - (time.monotonic() - w0)))
                samples.append(proc_status(proc.pid)["VmRSS"])
            cpu1, w1 = proc_cpu_seconds(proc.pid), time.monotonic()
            load1 = proc_cpu_seconds(os.getpid())
            api_probe = json.loads((await asyncio.to_thread(probe.communicate, None, 60))[0])
            m1 = scrape(metrics_port)
            end = proc_status(proc.pid)
            window_requests = api.log[requests0:]
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            health.close()

    # --- results
    wall = w1 - w0
    deltas = {le: m1["buckets"][le] - m0["buckets"].get(le, 0.0) for le in m1["buckets"]}
    count = m1["count"] - m0["count"]
    p50, p99 = quantile(0.5, deltas), quantile(0.99, deltas)
    to_running = [ramp.running[n] - ramp.created[n] for n in ramp.running if n in ramp.created]
    to_checked = [ramp.checked[n] - ramp.created[n] for n in ramp.checked if n in ramp.created]
    cores = (cpu1 - cpu0) / wall
    rss_steady = max(samples) / 1024
    rss_peak = end["VmHWM"] / 1024
    by_kind = collections.Counter(
        f"{r.verb} {r.resource}{'/' + r.subresource if r.subresource else ''}"
        for r in window_requests
        if not r.user_agent.startswith("lora-operator-local")  # the load's own requests
    )
    ms = lambda v: None if v is None else round(1000 * v, 2)  # noqa: E731
    result: dict[str, Any] = {
        "bench": "operator_scale",
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "python_executable": sys.executable,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "versions": versions(),
        "setup": {
            "jobs": args.jobs,
            "health_interval_s": args.interval,
            "window_s": round(wall, 1),
            "operator_cpu": args.operator_cpu,
            "load_cpu": args.load_cpu,
            "load": "LocalApiServer + local JobController + fake kubelet (pods Running/Ready "
            "at 127.x.y.z, no processes) + one lora_trainer exporter.serve/HealthMonitor "
            "/health server on 0.0.0.0, all pinned to the load core",
            "latency_method": "lora_operator_reconcile_duration_seconds bucket deltas over "
            "the window, linear interpolation within buckets (histogram_quantile)",
        },
        "reconcile": {
            "count_in_window": int(count),
            "per_second": round(count / wall, 1),
            "mean_ms": ms((m1["sum"] - m0["sum"]) / count) if count else None,
            "p50_ms": ms(p50),
            "p99_ms": ms(p99),
            "quantile_note": "10000 = beyond the last finite bucket (10 s): a lower limit",
            "fraction_over_10s": round(1 - deltas.get(10.0, 0) / count, 3) if count else None,
            "bucket_deltas": {str(k): int(v) for k, v in sorted(deltas.items())},
        },
        "operator_process": {
            "cpu_cores": round(cores, 4),
            "cpu_seconds_in_window": round(cpu1 - cpu0, 2),
            "rss_mib_steady_max": round(rss_steady, 1),
            "rss_mib_end": round(end["VmRSS"] / 1024, 1),
            "rss_mib_peak_hwm": round(rss_peak, 1),
            "rss_mib_idle_before_jobs": round(idle["VmRSS"] / 1024, 1),
            "rss_mib_after_ramp": round(after_ramp["VmRSS"] / 1024, 1),
            "threads": end["Threads"],
        },
        "ramp": {
            "create_seconds": round(created_s, 2),
            "all_running": all_running,
            "all_health_read": all_checked,
            "seconds_to_all_running": round(max(ramp.running.values()) - t0, 1)
            if ramp.running
            else None,
            "seconds_to_all_health_read": round(ramp_end - t0, 1),
            "created_to_running_s": {
                "p50": round(percentile(to_running, 0.5) or 0, 2),
                "p99": round(percentile(to_running, 0.99) or 0, 2),
                "max": round(max(to_running, default=0), 2),
            },
            "created_to_first_health_read_s": {
                "p50": round(percentile(to_checked, 0.5) or 0, 2),
                "max": round(max(to_checked, default=0), 2),
            },
        },
        "load_process": {
            "cpu_cores": round((load1 - load0) / wall, 4),
            "api_get_latency_ms_from_core": args.probe_cpu,
            **api_probe,
        },
        "jobs_by_phase_end": m1["jobs"],
        "health_read_errors_in_window": {
            k: v - m0["errors"].get(k, 0) for k, v in m1["errors"].items()
        },
        "operator_api_requests_in_window": {
            "total": sum(by_kind.values()),
            "per_second": round(sum(by_kind.values()) / wall, 1),
            "per_reconcile": round(sum(by_kind.values()) / count, 2) if count else None,
            "by_kind": dict(by_kind.most_common()),
        },
    }
    if not count:
        result["reconcile"]["note"] = (
            "no reconcile in the window: make --window longer than --interval (the timers of "
            "jobs created together tick together)"
        )
    result["goals"] = {
        "p99_ms<=100": p99 is not None and 1000 * p99 <= GOALS["p99_ms"],
        "cpu_cores<=1": cores <= GOALS["cpu_cores"],
        "rss_mib<=512": rss_peak <= GOALS["rss_mib"],
    }
    result["goals"]["all_met"] = all(result["goals"].values()) and all_running and all_checked
    if proc is not None and proc.returncode not in (0, None):
        result["operator_exit_code"] = proc.returncode
    tail = (work / "operator.log").read_text(errors="replace").splitlines()[-20:]
    result["operator_log_tail"] = tail
    shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=30.0, help="health interval (s)")
    parser.add_argument("--window", type=float, default=120.0, help="steady window (s)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    parser.add_argument(
        "--health-port", type=int, default=0, help="spec.monitoring.port (default: a free one)"
    )
    parser.add_argument("--operator-cpu", type=int, default=1)
    parser.add_argument("--load-cpu", type=int, default=0)
    parser.add_argument(
        "--probe-cpu",
        type=int,
        default=None,
        help="core of the API latency probe (default 2, or the load core on a 2-core machine)",
    )
    parser.add_argument("--resync", type=float, default=10.0, help="Job controller resync (s)")
    parser.add_argument("--create-concurrency", type=int, default=32)
    parser.add_argument("--ramp-timeout", type=float, default=420.0)
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.load_cpu})
    if args.probe_cpu is None:
        args.probe_cpu = 2 if (os.cpu_count() or 1) > 2 else args.load_cpu
    if not args.health_port:
        args.health_port = free_port()
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if result["goals"]["all_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
