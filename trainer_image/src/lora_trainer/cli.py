"""`lora-train`: the program every training pod runs.

lora-train --spec SPEC [--output DIR]        train (one rank; torchrun starts several)
lora-train --spec SPEC --preflight [--json]  pre-flight checks only (docs/preflight.md)
lora-train launch [LAUNCH OPTIONS] -- ARGS   the pods' entrypoint (torchrun / deepspeed)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_trainer.launch_env import world_size

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


ENV_TERMINATION_LOG = "LORA_TERMINATION_LOG"  # set by the operator: the termination log path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-train",
        description="LoRA fine-tuning from a LoRAFineTune spec. "
        "`lora-train launch --help` for the multi-process entrypoint.",
    )
    parser.add_argument("--spec", type=Path, required=True, help="LoRAFineTune manifest or spec")
    parser.add_argument("--output", type=Path, help="output directory (default: spec.output.uri)")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    parser.add_argument(
        "--preflight",
        action="store_true",
        help="only run the pre-flight checks (data, static rules, adapter, a few instrumented "
        "steps) and print a pass/fail table; exit 0 pass, 10 warn, 20 fail; writes nothing",
    )
    parser.add_argument(
        "--preflight-steps",
        type=int,
        default=2,
        metavar="N",
        help="instrumented optimizer steps of --preflight (default 2)",
    )
    parser.add_argument("--json", action="store_true", help="--preflight: print JSON")
    parser.add_argument(
        "--termination-log",
        type=Path,
        metavar="PATH",
        help="--preflight: also write the verdict and the failing checks there (a pod's "
        "terminationMessagePath, read by the operator)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:
        from lora_trainer.launch import main as launch_main

        return launch_main(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from lora_trainer.config import SpecError, load_spec, resolve_uri
    from lora_trainer.data import DataError

    try:
        name, spec = load_spec(args.spec)
        if args.preflight:
            return _preflight(spec, name, args.preflight_steps, args.json, args.termination_log)
        output = args.output or resolve_uri(spec.output.uri)
        from lora_trainer.train import run

        result = run(spec, output)
    except (SpecError, DataError) as err:
        print(f"lora-train: {err}", file=sys.stderr)
        return EXIT_ERROR
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if result.summary.get("final") and rank0:
        print(describe_gain(result.summary, output))
    if rank0 and result.summary.get("health") and os.environ.get(ENV_TERMINATION_LOG):
        _write_termination_log(Path(os.environ[ENV_TERMINATION_LOG]), result.summary["health"])
    return result.exit_code


def _write_termination_log(path: Path, health: dict[str, Any]) -> None:
    """The final verdict where the operator reads it (the pod's termination message): a
    job too short for the operator's health timer still ends with its verdict in status."""
    from lora_operator.health.summary import termination_message
    from lora_trainer.trace import json_safe

    try:
        path.write_text(termination_message(json_safe(health)))
    except OSError as exc:  # best effort: the run itself succeeded
        logging.getLogger(__name__).warning("cannot write %s: %s", path, exc)


def _preflight(
    spec: Any, name: str, steps: int, as_json: bool, termination_log: Path | None
) -> int:
    from lora_operator.health.preflight import summary_message
    from lora_trainer.preflight import run_preflight

    report = run_preflight(spec, steps=steps, name=name)
    print(json.dumps(report.to_dict(), indent=2) if as_json else report.table(), flush=True)
    if termination_log is not None:
        termination_log.write_text(summary_message(report.to_dict()))
    return report.exit_code


def describe_gain(summary: dict[str, Any], output: Path) -> str:
    """One line a user reads at the end: what the adapter changed, where it is."""
    from lora_operator.health.summary import gain_text

    return (
        f"lora-train: {summary['steps']} steps in {summary['runtime_seconds']:.0f}s; "
        f"{gain_text(summary)}; adapter: {output / 'adapter'}"
    )


def entrypoint() -> None:
    code = main()
    if world_size() > 1:
        # A rank of a multi-process run has written everything (adapter, summary, trace,
        # termination message) and left the process group. Interpreter finalization would
        # now tear down gloo/NCCL objects that DeepSpeed still references, which can abort
        # the process (SIGABRT, "terminate called without an active exception") after a
        # successful run: flush and leave without it.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
