"""study.json (every number, plain data) and study.md (the table, what the intervals can and cannot tell
apart, the figures, how each number is computed), both written from :func:`seg.study.aggregate.summarize`; the
columns, headings and figure names follow the study's metric (``summary["metric"]``: mIoU, top-1, ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from seg.study.figures import BAND, figure_files, sweep_figure_name
from seg.study.metrics import SEGMENTATION, StudyMetric


def study_metric(summary: dict[str, Any]) -> StudyMetric:
    """The metric a summary compares (segmentation's mIoU for one written before studies named theirs)."""
    return StudyMetric.from_dict(summary["metric"]) if "metric" in summary else SEGMENTATION


def pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def interval(ci: list[float] | None, signed: bool = False) -> str:
    return "–" if ci is None else f"[{pct(ci[0], signed)}, {pct(ci[1], signed)}]"


def _mean_std(e: dict[str, Any] | None, signed: bool = False) -> str:
    if e is None:
        return "–"
    return pct(e["mean"], signed) + ("" if e["std"] is None else f" ± {pct(e['std'])}")


def _convergence(row: dict[str, Any]) -> str:
    """Per seed: 'iteration (seconds)' of the first validation at the threshold, or why there is none."""
    parts = []
    for run in row["runs"]:
        reached = run["reached"]
        if run["status"] == "diverged":
            text = "diverged"
        elif reached is None:
            text = "not reached" if run["status"] == "finished" else run["status"]
        else:
            secs = reached["train_seconds"]
            text = f"{reached['iteration']}" + ("" if secs is None else f" ({secs:.0f} s)")
        parts.append(f"s{run['seed']}: {text}")
    return ", ".join(parts)


def table(summary: dict[str, Any]) -> list[str]:
    base, m = summary["baseline"], study_metric(summary)
    second = f" {m.secondary_label} % |" if m.secondary else ""
    lines = [
        f"| variant | runs finished / diverged / other | val {m.label} % (mean ± std) | 95% CI "
        f"| Δ {m.label} vs {base} (paired) | 95% CI of Δ |{second} s / iter (median) | peak memory "
        f"| reached 90% of {base}: iteration (s) |",
        "|---|---|---|---|---|---|" + ("---|" if m.secondary else "") + "---|---|---|",
    ]
    for name, row in summary["variants"].items():
        c, diff, final = row["counts"], row["diff_to_baseline"], row[m.key]
        failed = c["failed"] + c["interrupted"] + c["incomplete"]
        mem = "–" if row["peak_mem_gb"] is None else f"{row['peak_mem_gb']:.2f} GB ({row['mem_kind']})"
        spi = row["seconds_per_iteration_median"]
        lines.append(
            f"| {name} | {c['finished']} / {c['diverged']} / {failed} | {_mean_std(final)} "
            f"| {interval(final and final['ci95'])} "
            f"| {'baseline' if name == base else _mean_std(diff, signed=True)} "
            f"| {'' if name == base else interval(diff and diff['ci95'], signed=True)} |"
            + (f" {pct(row[f'{m.secondary}_mean'])} |" if m.secondary else "")
            + f" {'–' if spi is None else f'{spi:.3f}'} | {mem} | {_convergence(row)} |"
        )
    return lines


def verdict(summary: dict[str, Any], rows: dict[str, Any] | None = None) -> str:
    """Which paired differences to the baseline the 95% intervals separate from 0, and which they cannot (of the
    final metric, or of ``rows``: one iteration's, see :func:`at_iteration_section`)."""
    base = summary["baseline"]
    if len(summary["seeds"]) < 2:
        return ("One seed per variant: no standard deviation and no intervals, so the differences to "
                f"{base} are single observations that cannot be told apart from seed-to-seed noise.")
    apart, together, missing = [], [], []
    for name, row in (rows if rows is not None else summary["variants"]).items():
        diff = row["diff_to_baseline"]
        if name == base:
            continue
        if diff is None or diff["separated"] is None:
            missing.append(name)
        elif diff["separated"]:
            word = "higher" if diff["mean"] > 0 else "lower"
            apart.append(f"{name} ({word}: Δ {pct(diff['mean'], True)} points, CI {interval(diff['ci95'], True)})")
        else:
            together.append(f"{name} (Δ {pct(diff['mean'], True)}, CI {interval(diff['ci95'], True)})")
    parts = []
    if together:
        parts.append(f"The 95% intervals of the paired difference to {base} contain 0 for {', '.join(together)}: "
                     f"these differences cannot be separated from seed noise with {len(summary['seeds'])} seeds.")
    if apart:
        parts.append(f"They exclude 0 for {', '.join(apart)}: these differences are separated.")
    if missing:
        parts.append(f"No interval for {', '.join(missing)} (fewer than two seeds finished in both).")
    return " ".join(parts) or f"No variant besides {base}."


METHODS = """\
## How the numbers are computed

- **Final val {label}**: each run's validation record at its last iteration (`metrics.jsonl`; when a resumed run
  logged an iteration twice, the last record counts). Diverged and failed runs are left out of every mean and
  counted in the second column.
- **mean ± std**: sample standard deviation (n − 1). **95% CI**: mean ± t(0.975, n − 1) · std / √n (Student t,
  n = finished seeds).
- **Δ vs baseline (paired)**: per seed, variant − baseline (same seed: same initial draws and data order), over
  the seeds both finished; its mean ± std and t interval with n − 1 degrees of freedom. An interval that
  contains 0 cannot separate the variant from the baseline.
{secondary}- **s / iter**: the run's training-step seconds (`train_seconds`, carried over resumes; no validation or
  checkpoint time) / iterations, median over finished seeds. Runs of one study on one machine only compare
  fairly when they ran alike (same device, same `--jobs`).
- **peak memory**: the largest `peak_mem_gb` of the runs' train records; `cuda` = `torch.cuda.max_memory_allocated`,
  `rss` = the training process's peak resident set size (CPU runs).
- **reached 90%**: the first validation whose {label} is at least 90% of the baseline's mean final {label}
  ({threshold}), per seed; its resolution is `train.val_interval`.
"""


def _value_cell(row: dict[str, Any], picked: Any) -> str:
    if not row["complete"]:
        return f"{row['value']}: " + "/".join(row["statuses"] or ["not started"])
    spread = "" if len(row["scores"]) < 2 else f" [{pct(row['min'])}–{pct(row['max'])}]"
    diverged = sum(s == "diverged" for s in row["statuses"])
    mark = "**" if row["value"] == picked else ""
    return f"{mark}{row['value']}: {pct(row['mean'])}{spread}{mark}" + (f" ({diverged} diverged)" if diverged else "")


def selection_section(summary: dict[str, Any]) -> list[str]:
    """How each variant's swept value was picked: the rule, every value's score, the pick, edge warnings."""
    sel, m = summary.get("sweep"), study_metric(summary)
    if sel is None:
        return []
    opts = " ".join(sel["opts"]) or "none"
    lines = [
        f"## Selection of `{sel['key']}` per variant",
        "",
        f"Rule `{sel['rule']}` (written in the study file before the runs): {sel['rule_text']}. Selection runs: "
        f"seeds {sel['seeds']} (the reported runs use seeds {summary['seeds']}, so no reported number comes from a "
        f"run that took part in the choice), extra overrides for them: `{opts}`. Cells: value: final val "
        f"{m.label} % (mean over the selection seeds, [min–max] with several); the pick in bold.",
        "",
        "| variant | picked | values tried |",
        "|---|---|---|",
    ]
    edges = []
    for name, row in sel["variants"].items():
        picked = "–" if row["picked"] is None else f"{row['picked']}"
        if row["picked"] is None:
            picked += f" ({row['why_none']})"
        if row["at_edge"]:
            edges.append(name)
        lines.append(f"| {name} | {picked} | {'; '.join(_value_cell(r, row['picked']) for r in row['values'])} |")
    lines.append("")
    waiting = [name for name, row in sel["variants"].items() if row["picked"] is None]
    if edges:
        lines += [f"At an end of the swept range: {', '.join(edges)}. The best value may lie outside it; widen the "
                  "range to be sure.", ""]
    elif len(waiting) < len(sel["variants"]):
        lines += ["Every pick made lies inside the swept range.", ""]
    if waiting:
        lines += [f"No pick yet for {', '.join(waiting)}: their reported runs have not started.", ""]
    added = [f"{name}: {', '.join(map(str, row['added']))}" for name, row in sel["variants"].items()
             if row.get("added")]
    if added:
        lines += [f"Values added by the extension rule (the pick was at an end): {'; '.join(added)}.", ""]
    fname = sweep_figure_name(sel, m)
    lines += [f"![{fname}]({fname})", ""]
    return lines


def at_iteration_section(summary: dict[str, Any]) -> list[str]:
    """The metric at each iteration the study file names in ``report_at`` (e.g. after one epoch)."""
    m, base, lines = study_metric(summary), summary["baseline"], []
    for it, rows in summary.get("at_iterations", {}).items():
        lines += [f"## Val {m.label} at iteration {it}", "",
                  f"| variant | val {m.label} % (mean ± std) | 95% CI | Δ vs {base} (paired) | 95% CI of Δ |",
                  "|---|---|---|---|---|"]
        for name, row in rows.items():
            est, diff = row[m.key], row["diff_to_baseline"]
            lines.append(f"| {name} | {_mean_std(est)} | {interval(est and est['ci95'])} "
                         f"| {'baseline' if name == base else _mean_std(diff, signed=True)} "
                         f"| {'' if name == base else interval(diff and diff['ci95'], signed=True)} |")
        lines += ["", verdict(summary, rows), ""]
    return lines


def markdown(summary: dict[str, Any]) -> str:
    threshold, m = summary["convergence_threshold"], study_metric(summary)
    opts = " ".join(summary["opts"]) or "none"
    lines = [
        f"# Study `{summary['name']}`",
        "",
        f"Base config `{summary['base']}`, seeds {summary['seeds']}, baseline `{summary['baseline']}`, "
        f"overrides for every run: `{opts}`. Command: `{summary['command']}`",
        "",
        *selection_section(summary),
        f"## Final validation {m.label}" + (" (reported seeds, each variant at its picked value)"
                                            if summary.get("sweep") else ""),
        "",
        *table(summary),
        "",
        verdict(summary),
        "",
        *at_iteration_section(summary),
        "## Figures",
        "",
    ]
    for fname in figure_files(m):
        lines += [f"![{fname}]({fname})", ""]
    lines += [f"{BAND}; n = runs with records.", ""]
    problems = [(v, r) for v, row in summary["variants"].items() for r in row["runs"] if r["status"] != "finished"]
    if problems:
        lines += ["## Runs that did not finish", ""]
        lines += [f"- {v}/seed{r['seed']}: {r['status']}" + (f": {r['message'].splitlines()[0]}" if r["message"]
                                                              else "") for v, r in problems]
        lines.append("")
    secondary = "" if not m.secondary else (
        f"- **{m.secondary_label} %**: the final validation's `{m.secondary}`, mean over the finished seeds.\n")
    lines.append(METHODS.format(threshold="none: the baseline has no finished run" if threshold is None
                                else f"{pct(threshold)}%", label=m.label, secondary=secondary))
    return "\n".join(lines)


def write_report(summary: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``out/study.json`` and ``out/study.md``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "study.json", out / "study.md"
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    md_path.write_text(markdown(summary))
    return json_path, md_path
