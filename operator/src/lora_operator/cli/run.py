"""`lora-operator run`: the operator itself (kopf underneath)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from lora_operator.api import constants as c
from lora_operator.controller.settings import (
    ENV_HEALTH_INTERVAL,
    ENV_IMAGE_ALLOWLIST,
    ENV_METRICS_PORT,
    ENV_NAMESPACES,
    ENV_PEERING,
    ENV_TRAINER_IMAGE,
    OperatorConfig,
)

EPILOG = f"""\
Settings come from the environment and are overridden by the flags:
  {ENV_TRAINER_IMAGE}  trainer image for specs without spec.image
  {ENV_NAMESPACES}     comma-separated namespaces to watch (default: all)
  {ENV_IMAGE_ALLOWLIST}  comma-separated image prefixes spec.image must start with
  {ENV_HEALTH_INTERVAL}  seconds between reads of each running job's /health (15)
  {ENV_METRICS_PORT}  port of /metrics, /healthz and /readyz (8080)
  {ENV_PEERING}  kopf peering name for several replicas (default: standalone)
The API is reached in-cluster (service account), else through --kubeconfig, $KUBECONFIG or
~/.kube/config.
"""


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "run",
        help="run the operator (reconcile LoRAFineTunes into training Jobs)",
        description="Watch LoRAFineTunes and run them as Indexed Jobs until Ctrl-C/SIGTERM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=None,
        help=f"a namespace to watch (repeatable; default: ${ENV_NAMESPACES} or all)",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument(
        "--standalone", action="store_true", help="no peering with other operator replicas"
    )
    peering.add_argument(
        "--peering",
        default=None,
        metavar="NAME",
        help="peer with other replicas through kopf's KopfPeering NAME (one is active)",
    )
    parser.add_argument(
        "--health-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"seconds between /health reads of each running job (${ENV_HEALTH_INTERVAL}, 15)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help=f"port of /metrics, /healthz, /readyz (${ENV_METRICS_PORT}, 8080; 0: off)",
    )
    parser.add_argument("--trainer-image", default=None, help="default trainer image")
    parser.add_argument("--kubeconfig", type=Path, default=None, help="kubeconfig file to use")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    config = OperatorConfig.from_env()
    changes: dict[str, Any] = {"kubeconfig": args.kubeconfig}
    if args.all_namespaces:
        changes["namespaces"] = ()
    elif args.namespace:
        changes["namespaces"] = tuple(args.namespace)
    if args.trainer_image:
        changes["trainer_image"] = args.trainer_image
    if args.health_interval is not None:
        if args.health_interval <= 0:
            raise ValueError("--health-interval: expected a positive number of seconds")
        changes["health_interval_seconds"] = args.health_interval
    if args.metrics_port is not None:
        changes["metrics_port"] = args.metrics_port or None
    if args.peering:
        changes["peering"] = args.peering
    elif args.standalone:
        changes["peering"] = None
    return dataclasses.replace(config, **changes)


def run(args: argparse.Namespace) -> int:
    import kopf

    from lora_operator.controller.handlers import operate

    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"run: {exc}", file=sys.stderr)
        return c.EXIT_USAGE
    kopf.configure(verbose=args.verbose)
    if not args.verbose:  # one INFO line per handler run is noise at a thousand jobs' ticks
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        asyncio.run(operate(config))
    except OSError as exc:
        print(f"run: {exc}", file=sys.stderr)
        return c.EXIT_ERROR
    return c.EXIT_OK
