"""`lora-operator preflight SPEC`: validate a spec, then run the trainer's pre-flight checks.

The instrumented part (real model, real data, a few optimizer steps) needs the trainer
(`lora_trainer`, torch); it runs in a subprocess, `python -m lora_trainer --spec SPEC
--preflight --json`, so this package never imports torch. Without the trainer only the
static checks run (the StaticConfig rule on the spec), with a note. docs/preflight.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from lora_operator.api import constants as c
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.health import HealthConfig
from lora_operator.health.preflight import EXIT_CODES, render_table, rule_check
from lora_operator.health.window import Window
from lora_operator.validation import validate_file

NO_TRAINER = (
    "the trainer (lora_trainer with torch) is not installed here: only the static checks ran; "
    "run `lora-train --spec SPEC --preflight` in the trainer image for the data, adapter and "
    "gradient-flow checks"
)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "preflight",
        help="pre-flight checks of a spec on its real model and data",
        description="Validate a LoRAFineTune like `validate`, then run the trainer's pre-flight "
        "checks (data statistics, static and data rules, adapted modules, trainable "
        "parameters, requires_grad, a few instrumented optimizer steps) and print a pass/fail "
        "table. Without the trainer installed only the static checks run. Exit 0 pass, "
        "10 warn, 20 fail, 1 invalid spec or trainer error, 2 usage.",
    )
    parser.add_argument("spec", type=Path, metavar="SPEC")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--steps", type=int, default=2, help="instrumented optimizer steps (default 2)"
    )
    parser.add_argument(
        "--static-only", action="store_true", help="skip the trainer: static checks only"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        results = validate_file(args.spec)
    except OSError as err:
        print(f"lora-operator preflight: cannot read {args.spec}: {err.strerror}", file=sys.stderr)
        return c.EXIT_USAGE
    bad = [r for r in results if not r.ok]
    for result in bad:
        for problem in result.problems:
            print(f"{result.source}: {result.name}: {problem}", file=sys.stderr)
    if bad or not results:
        return c.EXIT_ERROR
    if len(results) != 1 or results[0].resource is None:
        print(f"lora-operator preflight: {args.spec}: one LoRAFineTune per file", file=sys.stderr)
        return c.EXIT_USAGE
    name, spec = results[0].name, results[0].resource.spec
    if args.static_only or not trainer_available():
        report = static_report(spec, name)
        if not args.static_only:
            report["notes"].append(NO_TRAINER)
    else:
        trainer = run_trainer(args.spec, args.steps)
        if trainer is None:
            return c.EXIT_ERROR
        report = trainer
    if args.json:
        print(json.dumps({"spec": str(args.spec), **report}, indent=2))
    else:
        print(render_table(report))
    return int(report["exit_code"])


def trainer_available() -> bool:
    """True when `python -m lora_trainer` can run here (the trainer and torch installed)."""
    return all(importlib.util.find_spec(m) is not None for m in ("lora_trainer", "torch"))


def run_trainer(spec_path: Path, steps: int) -> dict[str, Any] | None:
    """The trainer's JSON report, or None (with the reason on stderr) when it did not give one."""
    command = [
        sys.executable,
        "-m",
        "lora_trainer",
        "--spec",
        str(spec_path),
        "--preflight",
        "--json",
        "--preflight-steps",
        str(steps),
        "--log-level",
        "WARNING",
    ]
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = None
    if proc.returncode not in EXIT_CODES.values() or not isinstance(report, dict):
        tail = proc.stdout.strip()[-2000:]
        print(
            f"lora-operator preflight: the trainer's pre-flight exited {proc.returncode} "
            f"without a report{': ' + tail if tail else ''}",
            file=sys.stderr,
        )
        return None
    return report


def static_report(spec: LoRAFineTuneSpec, name: str) -> dict[str, Any]:
    """The checks that need neither the model nor the data: the StaticConfig rule."""
    config = HealthConfig.from_spec(spec.health, spec.training, spec.lora)
    check = rule_check(c.RULE_STATIC_CONFIG, config, Window(step=0, config=config))
    verdict = check["status"]
    return {
        "name": name,
        "verdict": verdict,
        "exit_code": EXIT_CODES[verdict],
        "checks": [check],
        "skipped": ["data, adapter and instrumented steps: not run here"],
        "notes": [],
    }
