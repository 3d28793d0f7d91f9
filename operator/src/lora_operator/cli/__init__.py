"""`lora-operator`: the operator's command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lora_operator import __version__
from lora_operator.api import constants as c
from lora_operator.cli import crds, dev, health, local, local_api, preflight, report, run, validate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-operator",
        description="LoRA fine-tuning on Kubernetes that cannot fail silently.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    validate.register(commands)
    crds.register(commands)
    local_api.register(commands)
    health.register(commands)
    preflight.register(commands)
    run.register(commands)
    report.register(commands)
    dev.register(commands)
    local.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    return code


def entrypoint() -> None:
    sys.exit(main())


__all__ = ["build_parser", "c", "entrypoint", "main"]
