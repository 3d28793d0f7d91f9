"""`lora-operator report OUTPUT_DIR`: figures and report.html of a run's trace.jsonl."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lora_operator.api import constants as c


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "report",
        help="figures and report.html of a run's trace",
        description="Read OUTPUT_DIR/trace.jsonl (and summary.json, data_stats.json when "
        "there) and write report.html plus PNG figures: loss and eval metrics, per-module "
        "heatmaps of ||grad B||/||grad A|| and dW_rel, update ratios, the health timeline. "
        "Prints the path of report.html. Exit 1 when the trace is missing or unreadable.",
    )
    parser.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR")
    parser.add_argument(
        "--spec",
        type=Path,
        help="the job's LoRAFineTune manifest: replay the health rules with its settings "
        "(default: the verdict records the trainer wrote)",
    )
    parser.add_argument("--out", type=Path, help="directory for report.html (default OUTPUT_DIR)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        from lora_operator.report import ReportError, write_report  # matplotlib: report extra
    except ImportError as err:
        print(f"lora-operator report: needs the report extra ({err})", file=sys.stderr)
        return c.EXIT_ERROR
    try:
        path = write_report(args.output_dir, args.out, args.spec)
    except ReportError as err:
        print(f"lora-operator report: {err}", file=sys.stderr)
        return c.EXIT_ERROR
    print(path)
    return c.EXIT_OK
