"""`lora-operator health replay TRACE.jsonl`: the health rules' verdict timeline of a trace."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lora_operator.api import constants as c
from lora_operator.health import HealthConfig, Record, RecordError, Timeline, parse_record, replay
from lora_operator.validation import SpecFileError, health_config_of_file

WARNINGS_SHOWN = 20


class InputError(Exception):
    """The trace or spec cannot be used at all (exit 2)."""


def register(commands: Any) -> None:
    parser = commands.add_parser("health", help="health rules: replay a trace")
    sub = parser.add_subparsers(dest="health_command", metavar="SUBCOMMAND", required=True)
    replay_parser = sub.add_parser(
        "replay",
        help="verdict timeline of a trace.jsonl",
        description="Replay a trainer's trace.jsonl through the health rules and print the "
        "verdict timeline (first firing step per rule, evidence). Exit 0 healthy, 10 warning, "
        "20 degraded or critical (the worst verdict of the run), 2 when the trace or spec "
        "cannot be read. Malformed lines are skipped with a warning.",
    )
    replay_parser.add_argument("trace", type=Path, metavar="TRACE.jsonl")
    replay_parser.add_argument(
        "--spec", type=Path, help="the job's LoRAFineTune manifest (thresholds, grace, warmup)"
    )
    replay_parser.add_argument(
        "--data-stats",
        type=Path,
        help="data_stats.json for the DataQuality rule (default: next to the trace, if there)",
    )
    replay_parser.add_argument("--json", action="store_true", help="print JSON")
    replay_parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.spec)
        records, warnings = read_trace(args.trace)
        stats = load_data_stats(args.data_stats or args.trace.parent / "data_stats.json")
    except InputError as err:
        print(f"lora-operator health replay: {err}", file=sys.stderr)
        return c.EXIT_USAGE
    timeline = replay(records, config, stats)
    for warning in [*warnings, *timeline.warnings][:WARNINGS_SHOWN]:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps({"trace": str(args.trace), **timeline.to_dict()}, indent=2))
    else:
        print(render_text(args.trace, timeline))
    return timeline.exit_code


def load_config(spec_path: Path | None) -> HealthConfig:
    if spec_path is None:
        return HealthConfig()
    try:
        return health_config_of_file(spec_path)
    except SpecFileError as err:
        raise InputError(str(err)) from err


def read_trace(path: Path) -> tuple[list[Record], list[str]]:
    """The trace's records (with line numbers) and a warning per skipped line."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from err
    records, warnings = [], []
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            records.append(parse_record(json.loads(raw.decode("utf-8")), number))
        except UnicodeDecodeError:
            warnings.append(f"{path}:{number}: skipped: not UTF-8 text")
        except json.JSONDecodeError as err:
            warnings.append(f"{path}:{number}: skipped: not JSON ({err.msg})")
        except RecordError as err:
            warnings.append(f"{path}:{number}: skipped: {err}")
    if not any(r.is_training for r in records):
        first = f"; first problem: {warnings[0]}" if warnings else ""
        raise InputError(f"{path}: no training records ({len(warnings)} line(s) skipped){first}")
    return records, warnings


def load_data_stats(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {path}: {err}") from err
    return stats if isinstance(stats, dict) else None


def render_text(trace: Path, timeline: Timeline) -> str:
    grace = timeline.grace_end_step
    lines = [
        f"{trace}: {timeline.last_step} steps, {timeline.evaluations} evaluations, "
        f"grace {'ended at step ' + str(grace) if grace is not None else 'not over'}",
        f"verdict: {timeline.verdict} (worst during the run: {timeline.worst_verdict})",
    ]
    if not timeline.rules:
        lines.append("no rule fired")
    for entry in timeline.rules:
        worst = ", ".join(
            f"{w.get('module')} {_fmt(w.get('value'))}" for w in entry.evidence.get("worst", [])
        )
        lines.append(
            f"{entry.rule} ({entry.severity}): first firing at step {entry.first_firing_step} "
            f"(condition since step {entry.first_condition_step})"
            f"{'' if entry.firing_at_end else ', cleared by the end'}\n"
            f"    {entry.message}" + (f"\n    worst: {worst}" if worst else "")
        )
    lines.append("timeline:")
    for t in timeline.transitions:
        rules = f" ({', '.join(t.rules)})" if t.rules else ""
        lines.append(f"  step {t.step}: {t.verdict}{rules}")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
