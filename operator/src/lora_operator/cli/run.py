"""`lora-operator run`: the operator itself (kopf underneath)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any

from lora_operator.api import constants as c
from lora_operator.controller.settings import (
    ENV_IMAGE_ALLOWLIST,
    ENV_NAMESPACES,
    ENV_TRAINER_IMAGE,
    OperatorConfig,
)

EPILOG = f"""\
Settings come from the environment and are overridden by the flags:
  {ENV_TRAINER_IMAGE}  trainer image for specs without spec.image
  {ENV_NAMESPACES}     comma-separated namespaces to watch (default: all)
  {ENV_IMAGE_ALLOWLIST}  comma-separated image prefixes spec.image must start with
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
    parser.add_argument(
        "--standalone", action="store_true", help="no peering with other operator replicas"
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
    return dataclasses.replace(config, **changes)


def run(args: argparse.Namespace) -> int:
    import kopf

    from lora_operator.controller.handlers import operate

    config = config_from_args(args)
    kopf.configure(verbose=args.verbose)
    try:
        asyncio.run(operate(config, standalone=args.standalone))
    except OSError as exc:
        print(f"run: {exc}", file=sys.stderr)
        return c.EXIT_ERROR
    return c.EXIT_OK
