"""The chaos figures: turn the result rows of `make chaos` into the markdown table in
docs/reliability.md.

    LORA_CHAOS_RESULTS=/tmp/chaos.jsonl .venv/bin/pytest -m "" tests/chaos
    .venv/bin/python bench/chaos_table.py /tmp/chaos.jsonl [--doc docs/reliability.md]
    .venv/bin/python bench/chaos_table.py /tmp/some.jsonl --merge   # after rerunning a few

Each test of tests/chaos appends one JSON row (fault, jobs, duplicates, status_errors,
steps_lost, outcome, seconds, details) to $LORA_CHAOS_RESULTS. This script writes the table
(one line per row, a total line) between the markers below in the doc, and prints it. With
--merge, the rows already in the doc's table stay, except those with the same suite and
fault as a new row, which the new row replaces in place; new faults go after the last row
of their suite.
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


def doc_rows(doc: Path) -> list[dict[str, Any]]:
    """The rows of the table now in DOC (the total line left out), as result rows."""
    body = doc.read_text()
    if BEGIN not in body:
        return []
    section = body.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = []
    for line in section.strip().splitlines()[2:]:  # after the header and its rule
        cells = [x.strip() for x in line.strip().strip("|").split("|")]
        if len(cells) != 8 or cells[0] == "**total**":
            continue
        outcome, _, details = cells[6].partition(": ")
        rows.append({"suite": cells[0], "fault": cells[1], "jobs": int(cells[2]),
                     "duplicates": int(cells[3]), "status_errors": int(cells[4]),
                     "steps_lost": int(cells[5]), "outcome": outcome,
                     "details": [details] if details else [],
                     "seconds": float(cells[7]) if cells[7] else ""})  # fmt: skip
    return rows


def merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OLD with each row of NEW replacing the one of the same suite and fault, or inserted
    after the last row of its suite (at the end for a new suite)."""
    rows = list(old)
    for row in new:
        key = (row.get("suite"), row.get("fault"))
        same = [i for i, r in enumerate(rows) if (r.get("suite"), r.get("fault")) == key]
        if same:
            rows[same[0]] = row
            continue
        suite = [i for i, r in enumerate(rows) if r.get("suite") == row.get("suite")]
        rows.insert(suite[-1] + 1 if suite else len(rows), row)
    return rows


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
    parser.add_argument(
        "--merge", action="store_true", help="keep the doc's other rows (after rerunning a few)"
    )
    args = parser.parse_args(argv)
    rows = load(args.results)
    if args.merge:
        rows = merge(doc_rows(args.doc), rows)
    text = table(rows)
    print(text)
    if not args.no_doc:
        rewrite(args.doc, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
