"""`lora-operator validate FILE...`: check manifests before `kubectl apply` (e.g. in CI)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lora_operator.api import constants as c
from lora_operator.validation import DocumentResult, validate_file


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "validate",
        help="validate LoRAFineTune manifests (schema, CEL rules, models)",
        description="Validate LoRAFineTune manifests offline with the CRD's schema and CEL "
        "rules and the operator's models. Exit 0 when all are valid, 1 otherwise.",
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE")
    parser.add_argument(
        "-o", "--output", choices=["text", "json"], default="text", help="output format"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    results = [_with_operator_checks(r) for path in args.files for r in validate_file(path)]
    if args.output == "json":
        print(json.dumps([_as_json(r) for r in results], indent=2))
    else:
        for result in results:
            _print_text(result, args.quiet)
    return c.EXIT_OK if all(r.ok for r in results) else c.EXIT_ERROR


def _with_operator_checks(result: DocumentResult) -> DocumentResult:
    """Add what the operator checks beyond the API server (names it sets itself, its ports
    and volumes, the image allow-list from $LORA_OPERATOR_IMAGE_ALLOWLIST): a spec that
    passes here is one the operator accepts."""
    from lora_operator.controller.settings import OperatorConfig
    from lora_operator.controller.spec_checks import semantic_problems

    if result.resource is None or result.problems:
        return result
    problems = semantic_problems(result.resource.spec, OperatorConfig.from_env())
    if not problems:
        return result
    return DocumentResult(result.source, result.name, sorted(problems), None)


def _print_text(result: DocumentResult, quiet: bool) -> None:
    if result.ok and result.resource is not None:
        if not quiet:
            print(f"{result.source}: {result.name}: valid ({summary(result)})")
        return
    for problem in result.problems:
        print(f"{result.source}: {result.name}: {problem}", file=sys.stderr)


def summary(result: DocumentResult) -> str:
    """One line a user can check at a glance: model, adapter, schedule, scale."""
    assert result.resource is not None
    spec = result.resource.spec
    t, lora, d = spec.training, spec.lora, spec.distributed
    length = f"{t.max_steps} steps" if t.max_steps is not None else f"{t.epochs:g} epochs"
    scale = (
        f"{d.nodes} node(s) x {d.gpus_per_node} GPU"
        if d.device == "cuda"
        else f"{d.nodes} node(s) x {d.processes_per_node or 1} CPU process(es)"
    )
    zero = f", ZeRO-{d.deepspeed.zero_stage}" if d.deepspeed else ""
    return (
        f"{spec.model.source}; LoRA r={lora.r} alpha={lora.alpha:g} on "
        f"{','.join(lora.target_modules)} init={lora.init}; lr {t.learning_rate:g} {t.scheduler}, "
        f"{length}, {t.precision}; {scale} via {d.launcher}{zero}; "
        f"onDegraded={spec.health.on_degraded}"
    )


def _as_json(result: DocumentResult) -> dict[str, Any]:
    return {
        "file": result.source,
        "name": result.name,
        "valid": result.ok,
        "problems": [{"field": p.path, "message": p.message} for p in result.problems],
    }
