#!/usr/bin/env python3
"""Keep the Helm chart in step with the repository: the CRD and the README's values table.

- crds/*.yaml -> charts/lora-operator/templates/crd/<same name>, wrapped in
  `{{- if .Values.crds.enabled }}`, with `helm.sh/resource-policy: keep` when crds.keep;
- values.yaml's `# --` comments -> the values table of charts/lora-operator/README.md
  (between the `values-table` markers).

`--check` writes nothing and exits 1 naming every file that drifted.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "lora-operator"
CRDS = ROOT / "crds"
START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"
HEADER = (
    "{{- /* Generated from crds/%s by scripts/chart_sync.py; do not edit by hand. */ -}}\n"
    "{{- if .Values.crds.enabled }}\n"
)
KEEP = (
    "  {{- if .Values.crds.keep }}\n"
    "  annotations:\n"
    "    # `helm uninstall` keeps the CRD, and with it every LoRAFineTune\n"
    "    helm.sh/resource-policy: keep\n"
    "  {{- end }}\n"
)


def crd_template(name: str, text: str) -> str:
    """The CRD file as a chart template (no Go template syntax may leak from it)."""
    if "{{" in text or "}}" in text:
        raise ValueError(f"crds/{name} contains '{{{{' or '}}}}': escape it before wrapping")
    lines = [ln for ln in text.splitlines(keepends=True) if not ln.startswith("#")]
    body = "".join(lines)
    if "\nmetadata:\n" not in "\n" + body:
        raise ValueError(f"crds/{name}: no top-level metadata")
    if re.search(r"^  annotations:", body, re.MULTILINE):
        raise ValueError(f"crds/{name}: has metadata.annotations; merge the keep annotation")
    body = ("\n" + body).replace("\nmetadata:\n", "\nmetadata:\n" + KEEP, 1)[1:]
    return HEADER % name + body + "{{- end }}\n"


def values_rows(values_text: str) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every key with a `# --` comment above it."""
    data = yaml.safe_load(values_text)
    rows, stack, doc = [], [], ""
    for line in values_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            doc = stripped[4:].strip()
            continue
        if stripped.startswith("#") and doc:
            doc += " " + stripped[1:].strip()
            continue
        m = re.match(r"^( *)([A-Za-z0-9_]+):", line)
        if not m:
            if not stripped.startswith("#"):
                doc = "" if stripped and not stripped.startswith("-") else doc
            continue
        depth = len(m.group(1)) // 2
        del stack[depth:]
        stack.append(m.group(2))
        if doc:
            value = data
            for key in stack:
                value = value[key]
            rows.append((".".join(stack), _type(value), json.dumps(value), doc))
            doc = ""
    return rows


def _type(value: object) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}[
        type(value)
    ]


def values_table(values_text: str) -> str:
    out = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for key, kind, default, doc in values_rows(values_text):
        cell, text = default.replace("|", "\\|"), doc.replace("|", "\\|")
        out.append(f"| `{key}` | {kind} | `{cell}` | {text} |")
    return "\n".join(out) + "\n"


def readme_with_table(readme: str, table: str) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README.md lacks the {START} / {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}{END}{tail}"


def expected() -> dict[Path, str]:
    """Every generated file and its content."""
    files: dict[Path, str] = {}
    for crd in sorted(CRDS.glob("*.yaml")):
        files[CHART / "templates" / "crd" / crd.name] = crd_template(crd.name, crd.read_text())
    readme = CHART / "README.md"
    table = values_table((CHART / "values.yaml").read_text())
    files[readme] = readme_with_table(readme.read_text(), table)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail on drift, write nothing")
    args = parser.parse_args(argv)
    files = expected()
    stale = sorted(
        p for p in (CHART / "templates" / "crd").glob("*.yaml") if p not in files
    )  # a CRD removed from crds/
    drift = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for path in drift + stale:
            print(f"chart drift: {path.relative_to(ROOT)} (run scripts/chart_sync.py)")
        return 1 if drift or stale else 0
    for path in stale:
        path.unlink()
    for path in drift:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
