"""`lora-operator crds`: write or check the generated CRD files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lora_operator.api import constants as c
from lora_operator.api.crd import CRD_FILE, render_crd
from lora_operator.api.reference import render_reference
from lora_operator.health.reference import render_rules_doc

REFERENCE = Path("docs/api.md")
RULES_DOC = Path("docs/health-rules.md")


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "crds", help="generate the CRD from the API models (or --check for drift)"
    )
    parser.add_argument("--dir", type=Path, default=Path("crds"), help="output directory")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the files differ from the models"
    )
    parser.add_argument(
        "--reference", type=Path, default=REFERENCE, help="generated API reference (markdown)"
    )
    parser.add_argument(
        "--rules-doc", type=Path, default=RULES_DOC, help="generated health rules (markdown)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    outputs = {
        args.dir / CRD_FILE: render_crd(),
        args.reference: render_reference(),
        args.rules_doc: render_rules_doc(),
    }
    if args.check:
        stale = [p for p, text in outputs.items() if (p.read_text() if p.exists() else "") != text]
        for path in stale:
            print(f"{path} is out of date with lora_operator: run `make crds`", file=sys.stderr)
        if not stale:
            print(f"{', '.join(map(str, outputs))}: up to date")
        return c.EXIT_ERROR if stale else c.EXIT_OK
    for path, text in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return c.EXIT_OK
