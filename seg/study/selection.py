"""A study's sweep: each variant's selection runs read back, scored by the study file's rule, and the value it
picks for the reported runs. Selection runs use their own seeds (``sweep.seeds``), so no reported number comes
from a run that took part in the choice."""

from __future__ import annotations

from typing import Any

from seg.study.aggregate import RunResult
from seg.study.config import RULES, RunSpec, Study
from seg.study.stats import estimate

DIVERGED_SCORE = 0.0  # best_mean_final: a diverged selection run scores the metric's floor


def _value_row(value: Any, runs: list[RunResult], key: str) -> dict[str, Any]:
    """One swept value of one variant: its selection runs' finals (diverged -> 0), their mean, min, max."""
    statuses = [r.status for r in runs]
    done = all(s in ("finished", "diverged") for s in statuses) and len(runs) > 0
    scores = [r.final[key] if r.final is not None else DIVERGED_SCORE for r in runs] if done else []
    e = estimate(scores)
    return {
        "value": value,
        "seeds": [r.seed for r in runs],
        "statuses": statuses,
        "scores": scores,
        "mean": e and e.mean,
        "min": min(scores) if scores else None,
        "max": max(scores) if scores else None,
        "complete": done,
    }


def pick(rows: list[dict[str, Any]]) -> tuple[Any, str | None]:
    """best_mean_final over a variant's value rows: (value, None), or (None, why there is no pick yet)."""
    waiting = [str(r["value"]) for r in rows if not r["complete"]]
    if waiting:
        return None, f"selection runs not finished for {', '.join(waiting)}"
    best = max(rows, key=lambda r: r["mean"])  # max keeps the first of equal means: the value listed first
    return best["value"], None


def select(study: Study, specs: list[RunSpec], runs: list[RunResult], metric_key: str) -> dict[str, Any] | None:
    """study.json's ``sweep``: the rule, and per variant every value's scores, the pick (or why none) and whether
    the pick lies at an end of the swept range (then the best may lie outside it)."""
    sweep = study.sweep
    if sweep is None:
        return None
    by_spec = {spec.key: run for spec, run in zip(specs, runs, strict=True)}
    variants = {}
    for variant in study.variants:
        rows = []
        for value in sweep.values[variant]:
            keys = [spec.key for spec in specs if spec.variant == variant and spec.value == value]
            rows.append(_value_row(value, [by_spec[k] for k in keys], metric_key))
        picked, why = pick(rows)
        values = sweep.values[variant]
        variants[variant] = {
            "values": rows,
            "picked": picked,
            "why_none": why,
            "at_edge": picked is not None and len(values) > 1 and picked in (values[0], values[-1]),
        }
    return {"key": sweep.key, "seeds": sweep.seeds, "opts": sweep.opts, "rule": sweep.rule,
            "rule_text": RULES[sweep.rule], "metric": metric_key, "variants": variants}


def picks(selection: dict[str, Any] | None) -> dict[str, Any] | None:
    """variant -> picked value, for the variants that have one (None without a sweep)."""
    if selection is None:
        return None
    return {v: row["picked"] for v, row in selection["variants"].items() if row["picked"] is not None}
