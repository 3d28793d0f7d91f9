"""The chaos figures: turn the result rows of `make chaos` into the markdown table in
docs/reliability.md.

    LORA_CHAOS_RESULTS=/tmp/chaos.jsonl .venv/bin/pytest -m "" tests/chaos
    .venv/bin/python bench/chaos_table.py /tmp/chaos.jsonl [--doc docs/reliability.md]

Each test of tests/chaos appends one JSON row (fault, jobs, duplicates, status_errors,
steps_lost, outcome, seconds, details) to $LORA_CHAOS_RESULTS. This script writes the table
(one line per row, a total line) between the markers below in the doc, and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

BEGIN = "<!-- chaos-table:begin (bench/chaos_table.py writes this section) -->"
END = "<!-- chaos-table:end -->"
HEADER = (
    "| suite | fault injected | jobs run | duplicates found | status errors | steps lost "
    "| outcome | seconds |\n|---|---|---:|---:|---:|---:|---|---:|"
)


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(rows: list[dict[str, Any]]) -> str:
    lines = [HEADER]
    for r in rows:
        outcome = r.get("outcome", "")
        if outcome != "pass" and r.get("details"):
            outcome += ": " + "; ".join(str(d) for d in r["details"])[:160]
        cells = [r.get("suite", ""), r.get("fault", ""), r.get("jobs", 0),
                 r.get("duplicates", 0), r.get("status_errors", 0), r.get("steps_lost", 0),
                 outcome.replace("|", "/"), r.get("seconds", "")]  # fmt: skip
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    passed = sum(1 for r in rows if r.get("outcome") == "pass")
    total = [
        "**total**", f"**{len(rows)} faults, {passed} passed**",
        sum(int(r.get("jobs", 0)) for r in rows),
        sum(int(r.get("duplicates", 0)) for r in rows),
        sum(int(r.get("status_errors", 0)) for r in rows),
        sum(int(r.get("steps_lost", 0)) for r in rows), "",
        round(sum(float(r.get("seconds") or 0) for r in rows)),
    ]  # fmt: skip
    lines.append("| " + " | ".join(str(x) for x in total) + " |")
    return "\n".join(lines)


def rewrite(doc: Path, text: str) -> None:
    body = doc.read_text()
    if BEGIN not in body or END not in body:
        raise SystemExit(f"{doc}: no {BEGIN} ... {END} section")
    head, rest = body.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="the JSON-lines file of LORA_CHAOS_RESULTS")
    parser.add_argument("--doc", type=Path, default=Path("docs/reliability.md"))
    parser.add_argument("--no-doc", action="store_true", help="print only")
    args = parser.parse_args(argv)
    text = table(load(args.results))
    print(text)
    if not args.no_doc:
        rewrite(args.doc, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
