"""`lora-operator local-api`: an emulated Kubernetes API plus a local pod runner."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

from lora_operator.api import constants as c
from lora_operator.local.kubeconfig import kubeconfig

EPILOG = """\
The API server is an emulation (lora_operator.local): it keeps objects in memory, serves JSON
only and has no OpenAPI document. With kubectl, pass --validate=false to apply, create and
replace (e.g. `kubectl apply --validate=false -f crds/`), use -f manifests rather than
generators such as `kubectl create job` (they send protobuf), and keep KUBECACHEDIR as printed.
get, describe, wait, patch (incl. --subresource=status), delete and watch work as usual.

The pod runner plays the Job controller and the kubelet for batch/v1 Indexed Jobs and plain
pods: container images are ignored, each container's command runs on this machine as a local
process group with the current Python environment. Each pod gets its own loopback address
127.0.X.Y; a Job's pod hostnames (<job>-<index>.<subdomain>[.<ns>.svc.cluster.local]) are
rewritten to those addresses in env, command, args and workingDir, and resolve inside Python
processes through a sitecustomize hook on PYTHONPATH. ConfigMap, Secret and emptyDir volumes
are materialised as directories (mount paths rewritten likewise), PVCs as directories kept
under the state directory. Container logs: `kubectl logs` (no --follow) or
<state-dir>/pods/<namespace>/<pod>/<container>.log.
Ctrl-C stops everything and kills every pod's processes.
"""


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "local-api",
        help="run an emulated Kubernetes API and a local pod runner (dev and tests)",
        description="Start an emulated Kubernetes API server on 127.0.0.1 and a local pod "
        "runner, write a kubeconfig for it and serve until Ctrl-C.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--port", type=int, default=0, help="port to serve on (default: any)")
    parser.add_argument(
        "--kubeconfig",
        type=Path,
        default=None,
        help="where to write the kubeconfig (default: a file in the temp directory)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where pods' volumes and logs go (default: a temp directory removed on exit)",
    )
    parser.add_argument(
        "--no-runner", action="store_true", help="serve the API only; pods are not run"
    )
    parser.set_defaults(run=run)


@contextlib.asynccontextmanager
async def _runner(url: str, state_dir: Path | None, enabled: bool) -> AsyncIterator[Any]:
    if not enabled:
        yield None
        return
    from lora_operator.local.podrunner import PodRunner

    async with PodRunner.running(url, state_dir) as runner:
        yield runner


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    from lora_operator.local import LocalApiServer

    async with (
        LocalApiServer.running(port=args.port) as api,
        _runner(api.api_url, args.state_dir, not args.no_runner) as runner,
    ):
        path = args.kubeconfig or Path(tempfile.gettempdir()) / (
            f"lora-operator-local-{api.api_url.rsplit(':', 1)[1]}.kubeconfig"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(kubeconfig(api.api_url)))
        cache = path.with_suffix(".kubecache")
        print(f"Local Kubernetes API (emulated) on {api.api_url}", flush=True)
        if runner is not None:
            api.pod_logs = runner.log_path  # `kubectl logs` reads the runner's log files
            print(f"Pods run as local processes; state and logs in {runner.state}", flush=True)
        print(f"export KUBECONFIG={path}", flush=True)
        print(f"export KUBECACHEDIR={cache}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        try:
            await stop.wait()
        finally:
            if args.kubeconfig is None:  # ours: the server it names is about to go away
                path.unlink(missing_ok=True)
    print("Stopped." + ("" if args.no_runner else " Every pod's processes were killed."))


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(args, stop)


def run(args: argparse.Namespace) -> int:
    try:
        asyncio.run(_main(args))
    except OSError as exc:
        print(f"local-api: {exc}", file=sys.stderr)
        return c.EXIT_ERROR
    return c.EXIT_OK
