"""`lora-operator crds`: write or check the generated CRD files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lora_operator.api import constants as c
from lora_operator.api.crd import CRD_FILE, render_crd


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "crds", help="generate the CRD from the API models (or --check for drift)"
    )
    parser.add_argument("--dir", type=Path, default=Path("crds"), help="output directory")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the files differ from the models"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    path = args.dir / CRD_FILE
    text = render_crd()
    if args.check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            print(f"{path} is out of date with lora_operator.api: run `make crds`", file=sys.stderr)
            return c.EXIT_ERROR
        print(f"{path} is up to date")
        return c.EXIT_OK
    args.dir.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return c.EXIT_OK
