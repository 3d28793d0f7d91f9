"""write_report: load a run, draw every figure, write report.html next to them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_operator.api import constants as c
from lora_operator.health import RULES_BY_NAME, HealthConfig, Record
from lora_operator.report import plots, series
from lora_operator.report.html import Image, render_html
from lora_operator.report.load import ReportError, Run, SpecLike, health_config, load_run

REPORT_HTML = "report.html"
METRICS_PNG = "loss_and_eval.png"
GRAD_RATIO_PNG = "grad_ratio_heatmap.png"
DW_REL_PNG = "dw_rel_heatmap.png"
UPDATE_RATIO_PNG = "update_ratio.png"
HEALTH_PNG = "health_timeline.png"
FILES = (METRICS_PNG, GRAD_RATIO_PNG, DW_REL_PNG, UPDATE_RATIO_PNG, HEALTH_PNG)


@dataclass(frozen=True)
class RuleHeatmap:
    """A per-module heatmap figure with its health rule's threshold on the colour bar."""

    file: str
    data: Callable[[Sequence[Record]], series.Heatmap]
    rule: str
    title: str
    color_label: str
    caption: str  # "{rule}" stands for the rule's name


GRAD_RATIO = RuleHeatmap(
    GRAD_RATIO_PNG,
    series.grad_ratio_heatmap,
    c.RULE_LORA_GRADIENT_COLLAPSE,
    "Gradient-norm ratio ||grad B|| / ||grad A|| per module (log colour scale)",
    "||grad B|| / ||grad A|| (dimensionless, log scale)",
    "||grad B||/||grad A|| per layer.module over steps; red line on the colour bar: "
    "the {rule} threshold; x: grad A = 0 (ratio infinite).",
)
DW_REL = RuleHeatmap(
    DW_REL_PNG,
    series.dw_rel_heatmap,
    c.RULE_ADAPTER_NOT_LEARNING,
    "Relative weight update dW_rel = ||scale·B·A|| / ||W|| per module (log colour scale)",
    "dW_rel (fraction of ||W||, log scale)",
    "dW_rel per layer.module over steps: how much the adapter changes each weight; "
    "red line on the colour bar: the {rule} threshold.",
)


@dataclass(frozen=True)
class Report:
    """What was written, and the data behind the heatmaps (as plotted, before clipping)."""

    html: Path
    images: tuple[Path, ...]
    run: Run
    grad_ratio: series.Heatmap
    dw_rel: series.Heatmap


def write_report(
    output_dir: Path, out_dir: Path | None = None, spec: SpecLike | None = None
) -> Path:
    """Write report.html and its PNGs into out_dir (default: output_dir); the html's path.

    spec (a manifest path, a LoRAFineTuneSpec or a HealthConfig): replay the health rules
    with its settings instead of trusting the trace's verdict records. Raises ReportError
    (naming the file) when the trace is missing or unusable.
    """
    return render(output_dir, out_dir, spec).html


def render(output_dir: Path, out_dir: Path | None = None, spec: SpecLike | None = None) -> Report:
    config = health_config(spec) if spec is not None else HealthConfig()
    run = load_run(output_dir, config if spec is not None else None)
    out = out_dir or output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"cannot create {out}: {err.strerror or err}") from err
    headline = plots.headline_of(run)
    plots.plot_metrics(run, out / METRICS_PNG, headline)
    grad_ratio, grad_ratio_image = _plot_rule_heatmap(GRAD_RATIO, run, out, headline, config)
    dw_rel, dw_rel_image = _plot_rule_heatmap(DW_REL, run, out, headline, config)
    plots.plot_update_ratios(run, out / UPDATE_RATIO_PNG, headline)
    plots.plot_health(run, out / HEALTH_PNG, headline)
    images = [
        Image(METRICS_PNG, "Training loss and eval loss (left); eval BLEU and ROUGE-L (right)."),
        grad_ratio_image,
        dw_rel_image,
        Image(
            UPDATE_RATIO_PNG,
            "Per-step update-to-parameter ratio of lora_A and lora_B: "
            "median across modules, band from min to max (log scale).",
        ),
        Image(
            HEALTH_PNG,
            "Health verdict over steps; one row per rule that fired, named at the step it started.",
        ),
    ]
    level = (
        "ok"
        if headline.finding is None
        else ("warn" if headline.finding.severity == c.VERDICT_WARNING else "bad")
    )
    html_path = out / REPORT_HTML
    html_path.write_text(render_html(run, images, level), encoding="utf-8")
    return Report(html_path, tuple(out / f for f in FILES), run, grad_ratio, dw_rel)


def _plot_rule_heatmap(
    figure: RuleHeatmap, run: Run, out: Path, headline: plots.Headline, config: HealthConfig
) -> tuple[series.Heatmap, Image]:
    """Draw the figure into out; the data as plotted and the figure's captioned image."""
    heatmap = plots.plot_heatmap(
        figure.data(run.records),
        out / figure.file,
        headline,
        figure.title,
        figure.color_label,
        (figure.rule, _threshold(config, figure.rule)),
    )
    return heatmap, Image(figure.file, figure.caption.format(rule=figure.rule))


def _threshold(config: HealthConfig, rule: str) -> float:
    configured = config.settings(rule).threshold
    return configured if configured is not None else RULES_BY_NAME[rule].threshold
