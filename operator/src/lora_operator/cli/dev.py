"""`lora-operator dev`: the whole product on this machine, no cluster needed.

Starts the emulated Kubernetes API (with the CRD), the local pod runner and the operator in
one process tree, prints the `export KUBECONFIG=...` line for your own kubectl, applies the
manifests given, and shows a live table of the jobs until Ctrl-C (or, with
--exit-when-done, until every applied job has finished or been suspended; then it prints
each outcome and writes a run report).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lora_operator.api import constants as c
from lora_operator.controller.settings import OperatorConfig

DEFAULT_STATE = Path("/tmp/lora-operator/dev")  # noqa: S108 (a dev sandbox, like the demo's)
EPILOG = """\
Your kubectl works against it after the printed exports (pass --validate=false to apply:
the emulated API has no OpenAPI document), e.g.
  kubectl apply --validate=false -f examples/quickstart.yaml
  kubectl get lft -w
  kubectl describe lft quickstart
Pods run as local processes on loopback addresses; their logs are under the state directory
(and `kubectl logs`). Ctrl-C stops the operator, the API and every pod's processes.
"""


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "dev",
        help="run the emulated API, the pod runner and the operator on this machine",
        description="The whole product on this machine: an emulated Kubernetes API, a local "
        "pod runner and the operator, with a live table of the jobs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="*", type=Path, help="LoRAFineTune manifests to apply")
    parser.add_argument(
        "--exit-when-done",
        action="store_true",
        help="exit once every applied job finished or was suspended (prints the outcomes)",
    )
    parser.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE, help=f"(default {DEFAULT_STATE})"
    )
    parser.add_argument("--kubeconfig", type=Path, default=None, help="(default STATE/kubeconfig)")
    parser.add_argument("--port", type=int, default=0, help="API port (default: any free one)")
    parser.add_argument(
        "--health-interval",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="seconds between /health reads (default 3; the operator's default is 15)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="with --exit-when-done: give up after this long (exit 1)",
    )
    parser.add_argument("--no-report", action="store_true", help="do not write run reports")
    parser.set_defaults(run=run)


def load_manifests(files: list[Path]) -> list[dict[str, Any]]:
    """The LoRAFineTune documents of FILES; ValueError naming the file otherwise."""
    bodies = []
    for path in files:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: {exc}") from exc
        for doc in docs:
            if not isinstance(doc, dict) or doc.get("kind") != c.KIND:
                raise ValueError(f"{path}: only {c.KIND} documents can be applied here")
            bodies.append(doc)
    return bodies


def output_dir(body: dict[str, Any]) -> Path | None:
    """Where a job writes (file:// outputs only)."""
    uri = ((body.get("spec") or {}).get("output") or {}).get("uri") or ""
    return Path(uri.removeprefix("file://")) if uri.startswith("file://") else None


async def session(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from lora_operator.dev.cluster import dev_cluster
    from lora_operator.dev.table import COLUMNS, change_key, format_row, row, settled

    bodies = load_manifests(args.files)
    config = OperatorConfig(
        namespaces=("default",),
        health_interval_seconds=args.health_interval,
        metrics_port=None,
        watch_timeout_seconds=10,
    )
    args.state_dir.mkdir(parents=True, exist_ok=True)
    async with dev_cluster(
        args.state_dir, config, port=args.port, kubeconfig_path=args.kubeconfig
    ) as cluster:
        print(f"lora-operator dev: emulated API on {cluster.api.api_url}, operator running")
        print(f"pods run as local processes; logs under {cluster.runner.state}")
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        print(f"export KUBECACHEDIR={cluster.kubeconfig.with_suffix('.kubecache')}")
        print("Ctrl-C stops everything.", flush=True)
        names = []
        for body in bodies:
            created = await cluster.apply(body)
            names.append(created["metadata"]["name"])
            print(f"lorafinetune/{names[-1]} created", flush=True)
        start, shown = time.monotonic(), dict[str, tuple[Any, ...]]()
        print(f"{'TIME':>7}  {format_row(COLUMNS)}", flush=True)
        code = c.EXIT_OK
        while not stop.is_set():
            jobs = await cluster.lorafinetunes()
            for obj in jobs:
                key = change_key(obj)
                if shown.get(key[0]) != key:
                    shown[key[0]] = key
                    print(f"{time.monotonic() - start:6.0f}s  {format_row(row(obj))}", flush=True)
            mine = [o for o in jobs if o["metadata"]["name"] in names]
            if args.exit_when_done and len(mine) == len(names) and all(map(settled, mine)):
                break
            if args.exit_when_done and time.monotonic() - start > args.timeout:
                print(f"dev: not done after {args.timeout:.0f} s", file=sys.stderr)
                code = c.EXIT_ERROR
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        if args.exit_when_done:
            for obj in await cluster.lorafinetunes():
                if obj["metadata"]["name"] in names:
                    print(_describe(obj, not args.no_report), flush=True)
    print("Stopped: operator, API and every pod's processes.", flush=True)
    return code


def _describe(obj: dict[str, Any], report: bool) -> str:
    from lora_operator.dev.table import outcome

    out = output_dir(obj)
    summary = None
    if out is not None and (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
    text = outcome(obj, summary)
    if out is not None:
        text += f"\n  outputs: {out}"
        if report and (out / "trace.jsonl").is_file():
            text += f"\n  report: {write_report(out)}"
    return text


def write_report(out: Path) -> str:
    """The run report (needs the `report` extra: matplotlib)."""
    try:
        from lora_operator.report import write_report as write
    except ImportError:
        return "not written (install the report extra: pip install 'lora-operator[report]')"
    try:
        return str(write(out))
    except (OSError, ValueError) as exc:
        return f"not written: {exc}"


def run(args: argparse.Namespace) -> int:
    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await session(args, stop)

    try:
        return asyncio.run(main())
    except ValueError as exc:
        print(f"dev: {exc}", file=sys.stderr)
        return c.EXIT_ERROR
    except OSError as exc:
        print(f"dev: {exc}", file=sys.stderr)
        return c.EXIT_ERROR
