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
    """best_mean_final over a variant's value rows (in swept order): (value, None), or (None, why there is no pick
    yet)."""
    waiting = [str(r["value"]) for r in rows if not r["complete"]]
    if waiting:
        return None, f"selection runs not finished for {', '.join(waiting)}"
    best = max(rows, key=lambda r: r["mean"])  # max keeps the first of equal means
    return best["value"], None


def ordered(values: list[Any]) -> list[Any]:
    """Swept values in increasing order when they are all numbers (an extension adds them at either end)."""
    return sorted(values) if all(isinstance(v, (int, float)) for v in values) else list(values)


def extensions(study: Study, selection: dict[str, Any], values: dict[str, list[Any]]) -> dict[str, Any]:
    """variant -> the next value beyond its pick, for the picks at an end of its values that may still extend
    (``sweep.extend`` times per end beyond the file's values)."""
    sweep = study.sweep
    if sweep is None or not sweep.extend:
        return {}
    new = {}
    for variant, row in selection["variants"].items():
        vals, picked = ordered(values[variant]), row["picked"]
        listed = sweep.values[variant]
        if picked is None or len(vals) < 2:
            continue
        if picked == vals[0] and sum(v < min(listed) for v in vals) < sweep.extend:
            new[variant] = float(f"{vals[0] * vals[0] / vals[1]:.3g}")
        elif picked == vals[-1] and sum(v > max(listed) for v in vals) < sweep.extend:
            new[variant] = float(f"{vals[-1] * vals[-1] / vals[-2]:.3g}")
    return new


def select(study: Study, specs: list[RunSpec], runs: list[RunResult], metric_key: str,
           values: dict[str, list[Any]] | None = None) -> dict[str, Any] | None:
    """study.json's ``sweep``: the rule, and per variant every value's scores (the file's ``values`` unless given,
    e.g. with extensions), the pick (or why none) and whether the pick lies at an end of the swept range (then the
    best may lie outside it)."""
    sweep = study.sweep
    if sweep is None:
        return None
    values = sweep.values if values is None else values
    by_spec = {spec.key: run for spec, run in zip(specs, runs, strict=True)}
    variants = {}
    for variant in study.variants:
        vals = ordered(values[variant]) if sweep.extend else values[variant]
        rows = []
        for value in vals:
            keys = [spec.key for spec in specs if spec.variant == variant and spec.value == value]
            rows.append(_value_row(value, [by_spec[k] for k in keys], metric_key))
        picked, why = pick(rows)
        variants[variant] = {
            "values": rows,
            "added": [v for v in vals if v not in sweep.values[variant]],
            "picked": picked,
            "why_none": why,
            "at_edge": picked is not None and len(vals) > 1 and picked in (vals[0], vals[-1]),
        }
    rule_text = RULES[sweep.rule] + ("" if not sweep.extend else
                                     f"; a pick at an end of the values adds the next value beyond it (the same "
                                     f"ratio), at most {sweep.extend} per end")
    return {"key": sweep.key, "seeds": sweep.seeds, "opts": sweep.opts, "rule": sweep.rule, "extend": sweep.extend,
            "rule_text": rule_text, "metric": metric_key, "variants": variants}


def picks(selection: dict[str, Any] | None) -> dict[str, Any] | None:
    """variant -> picked value, for the variants that have one (None without a sweep)."""
    if selection is None:
        return None
    return {v: row["picked"] for v, row in selection["variants"].items() if row["picked"] is not None}
