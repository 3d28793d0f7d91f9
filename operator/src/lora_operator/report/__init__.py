"""`lora-operator report`: a run's trace as PNG figures and one self-contained report.html.

Needs matplotlib (the `report` extra). See docs/report.md for how to read the figures.
"""

from __future__ import annotations

from lora_operator.report.load import Health, ReportError, Run, SpecLike, load_run
from lora_operator.report.render import FILES, REPORT_HTML, Report, render, write_report

__all__ = [
    "FILES",
    "REPORT_HTML",
    "Health",
    "Report",
    "ReportError",
    "Run",
    "SpecLike",
    "load_run",
    "render",
    "write_report",
]
