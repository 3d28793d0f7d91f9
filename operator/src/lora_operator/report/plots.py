"""The report's figures: one PNG each, ~1200x600 px, Agg backend, deterministic file names.

Every figure's title is the run's headline (the rule that fired and the step, or "Healthy:
no rule fired") and the firing step is marked on every step axis.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.axis import Axis  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from lora_operator.api import constants as c  # noqa: E402
from lora_operator.report import series  # noqa: E402
from lora_operator.report.load import Finding, Run  # noqa: E402

FIGSIZE = (12.0, 6.0)
DPI = 100
STYLE: Mapping[str, object] = {
    "font.size": 12,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "figure.titlesize": 14,
    "legend.fontsize": 11,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.hashsalt": "lora-operator",
}
VERDICT_COLORS = {
    c.VERDICT_UNKNOWN: "#bdbdbd",
    c.VERDICT_HEALTHY: "#4caf50",
    c.VERDICT_WARNING: "#ffb300",
    c.VERDICT_DEGRADED: "#e53935",
    c.VERDICT_CRITICAL: "#7f0000",
}
HEADLINE_COLORS = {"ok": "#1b5e20", "warn": "#e65100", "bad": "#b71c1c"}
FIRING = "#b71c1c"


@dataclass(frozen=True)
class Headline:
    text: str
    finding: Finding | None

    @property
    def color(self) -> str:
        if self.finding is None:
            return HEADLINE_COLORS["ok"]
        return HEADLINE_COLORS["warn" if self.finding.severity == c.VERDICT_WARNING else "bad"]


def headline_of(run: Run) -> Headline:
    return Headline(run.health.headline, run.health.main_finding)


@contextmanager
def _figure(path: Path, headline: Headline, ncols: int = 1) -> Iterator[tuple[Figure, list[Axes]]]:
    with plt.rc_context(STYLE):  # type: ignore[arg-type]
        fig, axes = plt.subplots(1, ncols, figsize=FIGSIZE, dpi=DPI, squeeze=False)
        fig.suptitle(
            textwrap.fill(headline.text, 95),
            color=headline.color,
            fontweight="bold",
            x=0.01,
            ha="left",
        )
        try:
            yield fig, list(axes[0])
            fig.tight_layout()
            fig.savefig(path, dpi=DPI, metadata={"Software": None})
        finally:
            plt.close(fig)


def _mark_firing(ax: Axes, headline: Headline, label: bool = True) -> None:
    finding = headline.finding
    if finding is None:
        return
    ax.axvline(finding.step, color=FIRING, linestyle="--", linewidth=1.5)
    if label:
        left, right = ax.get_xlim()
        late = finding.step > (left + right) / 2  # label left of the line, inside the axes
        ax.annotate(
            f"{finding.rule}\nfired at step {finding.step}",
            xy=(finding.step, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(-4 if late else 4, -4),
            textcoords="offset points",
            ha="right" if late else "left",
            va="top",
            fontsize=10,
            color=FIRING,
            bbox={"facecolor": "white", "alpha": 0.85, "lw": 0, "pad": 2},
        )


def plot_metrics(run: Run, path: Path, headline: Headline) -> None:
    """Training and eval loss (left); eval BLEU and ROUGE-L (right, two y axes)."""
    with _figure(path, headline, ncols=2) as (_, (loss_ax, gen_ax)):
        loss = series.training_loss(run.records)
        loss_ax.plot(loss.steps, loss.values, color="#1f77b4", lw=1.2, label="training loss")
        ev = series.eval_metric(run.records, "eval_loss")
        if ev.steps:
            loss_ax.plot(ev.steps, ev.values, "o-", color="#d62728", lw=2, label="eval loss")
        loss_ax.set(title="Loss", xlabel="optimizer step", ylabel="cross-entropy (nats per token)")
        loss_ax.legend(loc="upper right")
        _mark_firing(loss_ax, headline, label=False)
        bleu = series.eval_metric(run.records, "eval_bleu")
        rouge = series.eval_metric(run.records, "eval_rougeL")
        gen_ax.set(title="Eval generation quality", xlabel="optimizer step")
        if not bleu.steps and not rouge.steps:
            gen_ax.text(
                0.5, 0.5, "no BLEU / ROUGE-L in the trace", ha="center", transform=gen_ax.transAxes
            )
        gen_ax.plot(bleu.steps, bleu.values, "s-", color="#2ca02c", label="BLEU")
        gen_ax.set_ylabel("BLEU (0-100)", color="#2ca02c")
        rouge_ax = gen_ax.twinx()
        rouge_ax.plot(rouge.steps, rouge.values, "^-", color="#9467bd", label="ROUGE-L")
        rouge_ax.set_ylabel("ROUGE-L F1 (0-1)", color="#9467bd")
        rouge_ax.grid(False)
        handles = gen_ax.get_lines() + rouge_ax.get_lines()
        gen_ax.legend(handles, [str(h.get_label()) for h in handles], loc="best")
        gen_ax.set_ylim(bottom=0)
        rouge_ax.set_ylim(bottom=0)
        _mark_firing(gen_ax, headline)


def _plain_log_ticks(axis: Axis, span: float) -> None:
    """Tick labels as plain numbers (0.02, 300) instead of 2x10^-2; minor labels if < 2 decades."""
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    if span < 100:
        axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        axis.set_minor_formatter(plain)
    else:
        axis.set_minor_formatter(NullFormatter())


def _edges(steps: tuple[int, ...]) -> np.ndarray:
    s = np.asarray(steps, dtype=float)
    if len(s) == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[max(s[0] - (mid[0] - s[0]), 0.0)], mid, [s[-1] + (s[-1] - mid[-1])]])


def plot_heatmap(
    heatmap: series.Heatmap,
    path: Path,
    headline: Headline,
    title: str,
    color_label: str,
    threshold: tuple[str, float] | None = None,
) -> series.Heatmap:
    """Rows = layer.module, columns = steps, log colour scale. Off-scale cells (inf: grad A
    exactly 0; 0) are clipped to the scale's ends and marked; NaN cells stay blank."""
    values = heatmap.values
    positive = values[np.isfinite(values) & (values > 0)]
    vmin, vmax = (float(positive.min()), float(positive.max())) if positive.size else (0.1, 10.0)
    if threshold is not None:  # the rule's threshold always on the colour bar
        vmin, vmax = min(vmin, threshold[1] / 1.5), max(vmax, threshold[1] * 1.5)
    if vmin == vmax:
        vmin, vmax = vmin / 2, vmax * 2
    shown = np.where(np.isposinf(values), vmax, np.where(values <= 0, vmin, values))
    with _figure(path, headline) as (fig, (ax,)):
        x = _edges(heatmap.steps)
        y = np.arange(len(heatmap.rows) + 1) - 0.5
        mesh = ax.pcolormesh(
            x,
            y,
            np.ma.masked_invalid(shown),
            norm=LogNorm(vmin, vmax),
            cmap="viridis",
            shading="flat",
        )
        centers = np.asarray(heatmap.steps, dtype=float)
        for mask, marker, label in (
            (np.isposinf(values), "X", "∞: grad A = 0 (clipped to the top of the scale)"),
            (values <= 0, "o", "0 (clipped to the bottom of the scale)"),
        ):
            rows, cols = np.nonzero(mask)
            if rows.size:
                ax.scatter(
                    centers[cols],
                    rows,
                    marker=marker,
                    s=70,
                    facecolors="white",
                    edgecolors="black",
                    linewidths=1,
                    label=label,
                )
        ax.set_yticks(range(len(heatmap.rows)), heatmap.rows)
        ax.invert_yaxis()
        ax.set(title=title, xlabel="optimizer step", ylabel="adapted module (layer.projection)")
        ax.grid(False)
        cbar = fig.colorbar(mesh, ax=ax, pad=0.02)
        cbar.set_label(color_label)
        _plain_log_ticks(cbar.ax.yaxis, vmax / vmin)
        if threshold is not None:
            cbar.ax.axhline(threshold[1], color="red", linewidth=3)
            ax.plot(
                [],
                [],
                color="red",
                linewidth=3,
                label=f"on the colour bar: {threshold[0]} threshold {threshold[1]:g}",
            )
        _mark_firing(ax, headline)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=10, framealpha=0.9)
    return heatmap


def plot_update_ratios(run: Run, path: Path, headline: Headline) -> dict[str, series.Band]:
    """Median and min-max band across modules of each matrix's update ratio, log y."""
    bands = {m: series.update_ratio_band(run.raw, m) for m in ("A", "B")}
    with _figure(path, headline) as (_, (ax,)):
        for matrix, color in (("A", "#1f77b4"), ("B", "#ff7f0e")):
            band = bands[matrix]
            if not band.steps:
                continue
            ax.fill_between(
                band.steps,
                band.low,
                band.high,
                color=color,
                alpha=0.2,
                label=f"lora_{matrix}: min-max across modules",
            )
            ax.plot(
                band.steps,
                band.median,
                "o-",
                color=color,
                lw=2,
                ms=4,
                label=f"lora_{matrix}: median",
            )
        ax.set_yscale("log")
        ax.set(
            title="Update-to-parameter ratio per optimizer step",
            xlabel="optimizer step",
            ylabel="||p_after - p_before|| / ||p_before||",
        )
        dropped = bands["A"].dropped + bands["B"].dropped
        if dropped:
            ax.text(
                0.99,
                0.02,
                f"{dropped} value(s) left out: infinite or 0 (at step 1 "
                "lora_B leaves 0 and lora_A has no gradient yet)",
                transform=ax.transAxes,
                ha="right",
                fontsize=10,
                color="#555555",
            )
        ax.legend(loc="upper right")
        _mark_firing(ax, headline)
    return bands


def rule_intervals(run: Run) -> dict[str, list[tuple[int, int]]]:
    """Steps during which each rule was firing: [(start, end)] from the verdict changes."""
    changes = run.health.changes
    out: dict[str, list[tuple[int, int]]] = {f.rule: [] for f in run.health.findings}
    for i, change in enumerate(changes):
        end = changes[i + 1].step if i + 1 < len(changes) else max(run.last_step, change.step)
        for rule in change.rules:
            spans = out.setdefault(rule, [])
            if spans and spans[-1][1] == change.step:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((change.step, end))
    return out


def plot_health(run: Run, path: Path, headline: Headline) -> None:
    """The verdict over steps as colour bands; one row per rule that fired, named at its start."""
    changes = run.health.changes
    last = max(run.last_step, 1)
    intervals = rule_intervals(run)
    rows = ["verdict", *intervals]
    with _figure(path, headline) as (_, (ax,)):
        starts = [0, *[ch.step for ch in changes]]
        verdicts = [c.VERDICT_UNKNOWN, *[ch.verdict for ch in changes]]
        for i, verdict in enumerate(verdicts):
            end = starts[i + 1] if i + 1 < len(starts) else last
            if end > starts[i] or i + 1 == len(starts):
                ax.broken_barh(
                    [(starts[i], max(end - starts[i], 0.5))],
                    (-0.4, 0.8),
                    color=VERDICT_COLORS.get(verdict, "#bdbdbd"),
                )
        severity = {f.rule: f.severity for f in run.health.findings}
        for row, (rule, spans) in enumerate(intervals.items(), start=1):
            color = VERDICT_COLORS.get(severity.get(rule, c.VERDICT_WARNING), "#ffb300")
            ax.broken_barh([(a, max(b - a, 0.5)) for a, b in spans], (row - 0.3, 0.6), color=color)
            first = next((f.step for f in run.health.findings if f.rule == rule), spans[0][0])
            late = first > last / 2  # label on the side of the marker with room for it
            ax.annotate(
                f"{rule} from step {first}",
                (first, row),
                xytext=(-8 if late else 6, 0),
                textcoords="offset points",
                ha="right" if late else "left",
                va="center",
                fontsize=11,
                fontweight="bold",
                bbox={"facecolor": "white", "alpha": 0.85, "lw": 0},
            )
            ax.plot([first], [row], marker="v", color="black", ms=10)
        if len(rows) == 1:
            ax.text(last / 2, 0.75, "no rule fired", ha="center", va="center", fontsize=13)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_ylim(len(rows) - 0.4 if len(rows) > 1 else 1.2, -0.6)
        ax.set_xlim(0, last * 1.02)
        ax.set(title=f"Health verdict over the run ({_source(run)})", xlabel="optimizer step")
        ax.grid(axis="y", visible=False)
        ax.legend(
            handles=[Patch(color=col, label=v) for v, col in VERDICT_COLORS.items()],
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            title="verdict",
        )


def _source(run: Run) -> str:
    return (
        "the trainer's verdict records" if run.health.source == "trace" else "replay of the rules"
    )
