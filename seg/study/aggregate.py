"""From run folders to numbers: each run's metrics.jsonl read back (:class:`RunResult`) and each variant's
statistics over seeds (:func:`summarize`), as plain data for study.json, study.md and the figures.

Every number is about the study's :class:`~seg.study.metrics.StudyMetric` (the task's metric: mIoU for
segmentation, top-1 for classification); study.json keys are named after it (``miou``, ``final_miou``,
``acc_mean`` for segmentation; ``top1``, ``final_top1``, ``top5_mean`` for classification)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seg.errors import UserError
from seg.study.metrics import SEGMENTATION, StudyMetric
from seg.study.stats import Estimate, estimate, median, paired_differences

CONVERGENCE_FRACTION = 0.9  # "converged" = first validation at or above 90% of the baseline's final mean metric
LEVEL = 0.95


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl in file order ([] when absent).

    A last line cut short (the process was killed while writing it) is dropped; a bad line elsewhere is an error.
    """
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path}:{i + 1}: not a JSON record: {e}") from None
    return rows


def latest_records(rows: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    """The ``event`` records, the LAST one per iteration (a resumed run repeats the iterations after its last
    checkpoint), sorted by iteration."""
    by_iteration = {r["iteration"]: r for r in rows if r.get("event") == event}
    return [by_iteration[i] for i in sorted(by_iteration)]


@dataclass
class RunResult:
    """What one run of the study produced. ``status``: finished | diverged | failed | interrupted | incomplete."""

    variant: str
    seed: int
    work_dir: str
    status: str
    iterations: int  # planned
    val: list[dict[str, Any]] = field(default_factory=list)  # deduplicated, by iteration
    train: list[dict[str, Any]] = field(default_factory=list)
    message: str | None = None  # why it diverged or failed

    @property
    def final(self) -> dict[str, Any] | None:
        """The validation at the last iteration (the trainer always validates there); None if not reached."""
        if self.status == "finished" and self.val and self.val[-1]["iteration"] == self.iterations:
            return self.val[-1]
        return None

    @property
    def seconds_per_iteration(self) -> float | None:
        """Training-step seconds over the whole run (carried over resumes) / iterations."""
        final = self.final
        if final is None or final.get("train_seconds") is None:
            return None
        return final["train_seconds"] / final["iteration"]

    @property
    def peak_memory(self) -> tuple[float, str] | None:
        """The largest ``peak_mem_gb`` of the run's train records, with its kind (cuda | rss)."""
        rows = [r for r in self.train if r.get("peak_mem_gb") is not None]
        if not rows:
            return None
        top = max(rows, key=lambda r: r["peak_mem_gb"])
        return top["peak_mem_gb"], top.get("mem_kind", "?")

    def first_reaching(self, threshold: float, key: str) -> dict[str, Any] | None:
        """Iteration and training seconds of the first validation with ``key`` (e.g. miou) >= ``threshold``."""
        for r in self.val:
            if r[key] >= threshold:
                return {"iteration": r["iteration"], "train_seconds": r.get("train_seconds")}
        return None


def load_run(variant: str, seed: int, work_dir: Path, iterations: int, outcome: tuple[str, str | None] | None = None
             ) -> RunResult:
    """A run's result from its folder; ``outcome`` is what the runner saw this time (status, message), if it ran.

    The folder decides first: a last record 'diverged' means diverged (the NaN guard stopped it), a validation
    at the last iteration means finished; otherwise the runner's outcome, else 'incomplete'.
    """
    rows = read_metrics(work_dir / "metrics.jsonl")
    val, train = latest_records(rows, "val"), latest_records(rows, "train")
    status, message = outcome or ("incomplete", None)
    if rows and rows[-1].get("event") == "diverged":
        status, message = "diverged", rows[-1].get("message")
    elif val and val[-1]["iteration"] == iterations:
        status, message = "finished", None
    elif status == "finished":  # exit code 0 without the last validation: not something to average
        status, message = "incomplete", f"no validation at iteration {iterations} in {work_dir / 'metrics.jsonl'}"
    elif outcome is None and not rows:
        message = "not started"
    return RunResult(variant, seed, str(work_dir), status, iterations, val, train, message)


# --------------------------------------------------------------------------------------------
# per-variant statistics

STATUSES = ("finished", "diverged", "failed", "interrupted", "incomplete")


def _estimate_dict(e: Estimate | None) -> dict[str, Any] | None:
    return None if e is None else {"n": e.n, "mean": e.mean, "std": e.std, "ci95": list(e.ci) if e.ci else None}


def final_values(runs: list[RunResult], key: str) -> dict[int, float]:
    """seed -> final val ``key`` (e.g. miou) of the finished runs (diverged and failed ones are left out)."""
    return {r.seed: r.final[key] for r in runs if r.final is not None}


def values_at(runs: list[RunResult], iteration: int, key: str) -> dict[int, float]:
    """seed -> val ``key`` at ``iteration`` of the finished runs that validated there (e.g. after one epoch)."""
    out = {}
    for r in runs:
        rec = next((v for v in r.val if v["iteration"] == iteration), None)
        if r.status == "finished" and rec is not None:
            out[r.seed] = rec[key]
    return out


def at_iteration(by_variant: dict[str, list[RunResult]], baseline: str, iteration: int, key: str
                 ) -> dict[str, Any]:
    """Every variant's val ``key`` at ``iteration`` over seeds, and its paired difference to the baseline."""
    base = values_at(by_variant[baseline], iteration, key)
    rows = {}
    for v, runs in by_variant.items():
        vals = values_at(runs, iteration, key)
        diff = None
        if v != baseline:
            d = paired_differences(vals, base)
            e = estimate(list(d.values()), LEVEL)
            diff = None if e is None else {**_estimate_dict(e), "seeds": sorted(d),
                                           "separated": None if e.ci is None else not e.contains(0.0)}
        rows[v] = {key: _estimate_dict(estimate(list(vals.values()), LEVEL)), "diff_to_baseline": diff}
    return rows


def baseline_threshold(baseline_runs: list[RunResult], key: str) -> float | None:
    """90% of the baseline's final ``key``, mean over its finished seeds (None when none finished)."""
    e = estimate(list(final_values(baseline_runs, key).values()))
    return None if e is None else CONVERGENCE_FRACTION * e.mean


def run_row(r: RunResult, threshold: float | None, metric: StudyMetric = SEGMENTATION) -> dict[str, Any]:
    """One run in study.json: its status and the numbers taken from its metrics.jsonl."""
    final, mem = r.final, r.peak_memory
    return {
        "seed": r.seed,
        "status": r.status,
        "message": r.message,
        "work_dir": r.work_dir,
        **{f"final_{k}": final and final.get(k) for k in metric.finals},
        "train_seconds": final and final.get("train_seconds"),
        "seconds_per_iteration": r.seconds_per_iteration,
        "peak_mem_gb": mem and mem[0],
        "mem_kind": mem and mem[1],
        "reached": None if threshold is None else r.first_reaching(threshold, metric.key),
    }


def paired_difference(runs: list[RunResult], baseline_runs: list[RunResult], key: str) -> dict[str, Any] | None:
    """Mean and t interval of (variant - baseline) final ``key`` over the seeds both finished; ``separated``:
    the interval excludes 0 (None without an interval)."""
    d = paired_differences(final_values(runs, key), final_values(baseline_runs, key))
    e = estimate(list(d.values()), LEVEL)
    if e is None:
        return None
    return {**_estimate_dict(e), "seeds": sorted(d), "separated": None if e.ci is None else not e.contains(0.0)}


def summarize_variant(runs: list[RunResult], baseline_runs: list[RunResult] | None, overrides: list[str],
                      threshold: float | None, metric: StudyMetric = SEGMENTATION) -> dict[str, Any]:
    """One variant in study.json: the final metric over seeds (key: the metric's, e.g. ``miou``), the paired
    difference to the baseline (None for the baseline itself), the secondary metric's mean (e.g. ``acc_mean``),
    median seconds per iteration, peak memory, the runs."""
    finished = [r for r in runs if r.final is not None]
    rows = [run_row(r, threshold, metric) for r in runs]
    mems = [(row["peak_mem_gb"], row["mem_kind"]) for row in rows if row["peak_mem_gb"] is not None]
    top_mem = max(mems, default=(None, None))
    secondary = {}
    if metric.secondary:
        e = estimate([r.final[metric.secondary] for r in finished if r.final.get(metric.secondary) is not None])
        secondary[f"{metric.secondary}_mean"] = e and e.mean
    return {
        "overrides": overrides,
        "counts": {s: sum(r.status == s for r in runs) for s in STATUSES},
        metric.key: _estimate_dict(estimate(list(final_values(runs, metric.key).values()), LEVEL)),
        "diff_to_baseline": None if baseline_runs is None else paired_difference(runs, baseline_runs, metric.key),
        **secondary,
        "seconds_per_iteration_median": median([r.seconds_per_iteration for r in finished
                                                if r.seconds_per_iteration is not None]),
        "peak_mem_gb": top_mem[0],
        "mem_kind": top_mem[1],
        "runs": rows,
    }


def check_records(runs: list[RunResult], metric: StudyMetric) -> None:
    """Every val record holds the study's metric; else a UserError naming the file (not a KeyError later)."""
    for r in runs:
        for rec in r.val:
            if metric.key not in rec:
                raise UserError(
                    f"{Path(r.work_dir) / 'metrics.jsonl'}: the val record at iteration {rec['iteration']} has no "
                    f"'{metric.key}' ({metric.label}, the metric this study compares); it holds "
                    f"{', '.join(k for k in rec if k not in ('event', 'iteration', 'time'))}")


def summarize(header: dict[str, Any], baseline: str, variants: dict[str, list[str]], runs: list[RunResult],
              metric: StudyMetric = SEGMENTATION, report_at: list[int] | None = None) -> dict[str, Any]:
    """study.json: ``header`` (the study's settings), the compared ``metric``, the convergence threshold (on
    that metric), one summary per variant."""
    check_records(runs, metric)
    by_variant = {v: [r for r in runs if r.variant == v] for v in variants}
    threshold = baseline_threshold(by_variant[baseline], metric.key)
    return {
        **header,
        "metric": metric.to_dict(),
        "baseline": baseline,
        "level": LEVEL,
        "convergence_fraction": CONVERGENCE_FRACTION,
        "convergence_threshold": threshold,
        "variants": {
            v: summarize_variant(vr, None if v == baseline else by_variant[baseline], variants[v], threshold,
                                 metric)
            for v, vr in by_variant.items()
        },
        "at_iterations": {str(it): at_iteration(by_variant, baseline, it, metric.key) for it in report_at or []},
    }
