"""`lora-operator local SPEC`: one LoRAFineTune on this machine, no Kubernetes API.

For trying a spec on a workstation GPU (or CPU) before submitting it: validates the manifest
as `kubectl apply` would, runs the trainer (`python -m lora_trainer`, which evaluates the
health rules in-process and applies spec.health.onDegraded=Fail itself), then prints the
outcome, writes the run report and exits with the verdict: 0 healthy, 10 warning, 20
degraded or critical (also when the health policy stopped the run), 1 invalid input or a
trainer failure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lora_operator.api import constants as c

VERDICT_CODES = {
    c.VERDICT_HEALTHY: c.EXIT_VERDICT_HEALTHY,
    c.VERDICT_UNKNOWN: c.EXIT_VERDICT_HEALTHY,  # too short to evaluate: nothing fired
    c.VERDICT_WARNING: c.EXIT_VERDICT_WARNING,
    c.VERDICT_DEGRADED: c.EXIT_VERDICT_DEGRADED,
    c.VERDICT_CRITICAL: c.EXIT_VERDICT_DEGRADED,
}


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "local",
        help="run one LoRAFineTune on this machine (no cluster): train, judge, report",
        description="Validate SPEC, train it here with the health rules in-process, print "
        "the outcome, write report.html; exit 0 healthy, 10 warning, 20 degraded/critical, "
        "1 invalid spec or trainer error.",
    )
    parser.add_argument("spec", type=Path, help="a LoRAFineTune manifest")
    parser.add_argument("--output", type=Path, help="output directory (default: spec.output.uri)")
    parser.add_argument("--no-report", action="store_true", help="do not write report.html")
    parser.set_defaults(run=run)


def verdict_code(verdict: str | None) -> int:
    return VERDICT_CODES.get(verdict or c.VERDICT_UNKNOWN, c.EXIT_ERROR)


def run(args: argparse.Namespace) -> int:
    from lora_operator.validation import validate_file

    results = validate_file(args.spec)
    problems = [str(p) for r in results for p in r.problems]
    if problems or len(results) != 1 or results[0].resource is None:
        for problem in problems or ["the file must hold exactly one LoRAFineTune"]:
            print(f"{args.spec}: {problem}", file=sys.stderr)
        return c.EXIT_ERROR
    spec = results[0].resource.spec
    output = args.output
    if output is None:
        if not spec.output.uri.startswith("file://"):
            print(f"{args.spec}: spec.output.uri: local runs need file:// or --output DIR",
                  file=sys.stderr)  # fmt: skip
            return c.EXIT_USAGE
        output = Path(spec.output.uri.removeprefix("file://"))
    cmd = [sys.executable, "-m", "lora_trainer", "--spec", str(args.spec), "--output", str(output)]
    with tempfile.TemporaryDirectory() as tmp:
        final = Path(tmp) / "final-health.json"  # what a pod leaves in its termination log
        env = os.environ | {"LORA_TERMINATION_LOG": str(final)}
        try:
            code = subprocess.run(cmd, check=False, env=env).returncode
        except KeyboardInterrupt:
            return 130
        health: dict[str, Any] = json.loads(final.read_text()) if final.is_file() else {}
    if code not in (c.EXIT_OK, c.EXIT_HEALTH_STOP):
        print(f"local: the trainer failed (exit {code})", file=sys.stderr)
        return c.EXIT_ERROR
    verdict = health.get("verdict")
    if code == c.EXIT_HEALTH_STOP:
        verdict = verdict if verdict in (c.VERDICT_DEGRADED, c.VERDICT_CRITICAL) else (
            c.VERDICT_DEGRADED
        )  # fmt: skip
    print(describe(verdict, health, code))
    if not args.no_report:
        from lora_operator.cli.dev import write_report

        print(f"report: {write_report(output)}")
    return verdict_code(verdict)


def describe(verdict: str | None, health: dict[str, Any], code: int) -> str:
    """The verdict line, with the rules that fired."""
    rules = health.get("rules") or []
    text = f"verdict: {verdict or c.VERDICT_UNKNOWN} at step {health.get('step', '?')}"
    if code == c.EXIT_HEALTH_STOP:
        text += " (stopped by spec.health.onDegraded=Fail)"
    for rule in rules:
        text += f"\n  {rule.get('rule')} ({rule.get('severity')}): {rule.get('message')}"
        text += f"\n    runbook: docs/runbooks/{rule.get('rule')}.md"
    return text
