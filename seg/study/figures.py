"""The study's PNG figures: the validation metric (the task's: mIoU, top-1) against iterations and against
training seconds, training loss against iterations; one line per variant (mean over its seeds) in a band from
the seeds' minimum to maximum. File names follow the metric: ``miou_vs_iteration.png``, ``top1_vs_seconds.png``."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, and no GUI toolkit picked up from the environment
import matplotlib.pyplot as plt  # noqa: E402

from seg.study.aggregate import RunResult  # noqa: E402
from seg.study.metrics import SEGMENTATION, StudyMetric  # noqa: E402

LABELS = {"iteration": "iteration", "train_seconds": "training seconds (steps only, mean over seeds)",
          "loss": "training loss"}
BAND = "line: mean over seeds; band: min-max over seeds"


def figure_files(metric: StudyMetric = SEGMENTATION) -> dict[str, tuple[str, str, str]]:
    """File name -> (event, x, y) of each figure; the metric's are in percent."""
    return {
        f"{metric.key}_vs_iteration.png": ("val", "iteration", metric.key),
        f"{metric.key}_vs_seconds.png": ("val", "train_seconds", metric.key),
        "loss_vs_iteration.png": ("train", "iteration", "loss"),
    }


def curve(runs: list[RunResult], event: str, x: str, y: str) -> tuple[list[float], list[float], list[float],
                                                                        list[float]]:
    """x, mean, min, max of ``y`` per iteration over the runs that logged that iteration.

    Runs are paired by iteration; for ``x='train_seconds'`` the x value is the mean over those runs of the
    seconds at that iteration (the seeds reach an iteration at slightly different times).
    """
    ys, xs = defaultdict(list), defaultdict(list)
    for r in runs:
        for rec in (r.val if event == "val" else r.train):
            if rec.get(y) is None or rec.get(x) is None:
                continue
            ys[rec["iteration"]].append(rec[y])
            xs[rec["iteration"]].append(rec[x])
    its = sorted(ys)
    return ([sum(xs[i]) / len(xs[i]) for i in its], [sum(ys[i]) / len(ys[i]) for i in its],
            [min(ys[i]) for i in its], [max(ys[i]) for i in its])


def plot(runs_by_variant: dict[str, list[RunResult]], event: str, x: str, y: str, path: Path, title: str,
         metric: StudyMetric = SEGMENTATION) -> Path:
    scale = 100.0 if y == metric.key else 1.0
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for variant, runs in runs_by_variant.items():
        xs, mean, lo, hi = curve(runs, event, x, y)
        if not xs:
            continue
        n = len([r for r in runs if (r.val if event == "val" else r.train)])
        (line,) = ax.plot(xs, [scale * v for v in mean], marker="o" if len(xs) < 15 else None, ms=3,
                          label=f"{variant} (n={n})")
        ax.fill_between(xs, [scale * v for v in lo], [scale * v for v in hi], color=line.get_color(), alpha=0.2,
                        linewidth=0)
    ax.set_xlabel(LABELS[x])
    ax.set_ylabel(f"val {metric.label} (%)" if y == metric.key else LABELS[y])
    ax.set_title(f"{title}\n{BAND}", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_figures(runs_by_variant: dict[str, list[RunResult]], out: Path, name: str,
                  metric: StudyMetric = SEGMENTATION) -> list[Path]:
    """The three figures in ``out``; runs that failed before logging anything simply add nothing."""
    return [plot(runs_by_variant, event, x, y, out / fname, name, metric)
            for fname, (event, x, y) in figure_files(metric).items()]


def sweep_figure_name(selection: dict, metric: StudyMetric = SEGMENTATION) -> str:
    return f"{metric.key}_vs_{selection['key'].rsplit('.', 1)[-1]}.png"


def write_sweep_figure(selection: dict, out: Path, name: str, metric: StudyMetric = SEGMENTATION) -> Path:
    """The selection: final val metric against the swept value, one line per variant (mean over the selection
    seeds, band min-max, a diverged run at 0), the picked value ringed; a log x axis for positive numbers that
    span more than a factor 10."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    numeric = True
    for variant, row in selection["variants"].items():
        points = [r for r in row["values"] if r["complete"]]
        if not points:
            continue
        numeric = numeric and all(isinstance(r["value"], (int, float)) for r in points)
        xs = [r["value"] if numeric else str(r["value"]) for r in points]
        (line,) = ax.plot(xs, [100 * r["mean"] for r in points], marker="o", ms=3, label=variant)
        ax.fill_between(xs, [100 * r["min"] for r in points], [100 * r["max"] for r in points],
                        color=line.get_color(), alpha=0.15, linewidth=0)
        for r in points:
            if r["value"] == row["picked"]:
                ax.plot([xs[points.index(r)]], [100 * r["mean"]], marker="o", ms=10, mfc="none",
                        color=line.get_color())
    positive = [r["value"] for row in selection["variants"].values() for r in row["values"]
                if isinstance(r["value"], (int, float)) and r["value"] > 0]
    if numeric and positive and max(positive) / min(positive) > 10:
        ax.set_xscale("log")
    ax.set_xlabel(selection["key"])
    ax.set_ylabel(f"final val {metric.label} (%)")
    seeds = ", ".join(map(str, selection["seeds"]))
    ax.set_title(f"{name}: selection runs (seeds {seeds}); ring: picked ({selection['rule']})\n"
                 "line: mean over selection seeds; band: min-max; diverged = 0", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / sweep_figure_name(selection, metric)
    fig.savefig(path)
    plt.close(fig)
    return path
