"""report.html: one self-contained page, the verdict on top, the figures linked relatively."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lora_operator.health.summary import GAIN_FIELDS
from lora_operator.report.load import Run

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1260px; margin: 1.5em auto; color: #222; }
h1 { font-size: 1.5em; padding: .5em .7em; border-radius: 6px; color: white; }
h1.ok { background: #2e7d32; } h1.warn { background: #ef6c00; } h1.bad { background: #c62828; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: .3em .8em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #444; margin-top: .3em; }
.meta { color: #666; }
"""


@dataclass(frozen=True)
class Image:
    file: str  # relative to report.html
    caption: str


def render_html(run: Run, images: Sequence[Image], level: str) -> str:
    health = run.health
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>LoRA run report: {_e(run.output_dir.name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f'<h1 class="{level}">{_e(health.headline)}</h1>',
        f'<p class="meta">{_e(str(run.output_dir))}: {run.last_step} steps; final verdict '
        f"<b>{_e(health.verdict)}</b> (from {_e(_source(run))}).</p>",
        _rules_table(run),
        _metrics_table(run.summary),
    ]
    for image in images:
        parts.append(
            f'<figure><img src="{_e(image.file)}" alt="{_e(image.caption)}">'
            f"<figcaption>{_e(image.caption)}</figcaption></figure>"
        )
    if run.warnings:
        parts.append(
            f'<p class="meta">{len(run.warnings)} trace line(s) skipped; first: '
            f"{_e(run.warnings[0])}</p>"
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _rules_table(run: Run) -> str:
    findings = run.health.findings
    if not findings:
        return "<p>No health rule fired during the run.</p>"
    rows = "".join(
        f"<tr><td>{_e(f.rule)}</td><td>{_e(f.severity)}</td><td>{f.step}</td>"
        f'<td style="text-align:left">{_e(f.message)}</td></tr>'
        for f in findings
    )
    return (
        "<h2>Rules that fired</h2><table><tr><th>rule</th><th>severity</th>"
        f"<th>from step</th><th>message</th></tr>{rows}</table>"
    )


def _metrics_table(summary: Mapping[str, Any] | None) -> str:
    if summary is None:
        return "<p>No summary.json (the run did not finish): no final metrics.</p>"
    base, final = summary.get("baseline") or {}, summary.get("final") or {}
    rows = []
    for key, label, fmt in GAIN_FIELDS:
        if isinstance(final.get(key), int | float) or isinstance(base.get(key), int | float):
            rows.append(
                f"<tr><td>{label}</td><td>{_num(base.get(key), fmt)}</td>"
                f"<td>{_num(final.get(key), fmt)}</td></tr>"
            )
    if not rows:
        return "<p>summary.json has no eval metrics.</p>"
    return (
        "<h2>Final metrics</h2><table><tr><th>metric</th><th>baseline (step 0)</th>"
        f"<th>final (step {_e(str(summary.get('steps', '?')))})</th></tr>"
        f"{''.join(rows)}</table>"
    )


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else "-"


def _source(run: Run) -> str:
    return (
        "the trainer's verdict records" if run.health.source == "trace" else "a replay of the rules"
    )


def _e(text: str) -> str:
    return html.escape(text, quote=True)
