"""A whole study, start to end: plan and check every run, run what is left (a sweep's selection runs first, then
the reported runs at each variant's pick), read the run folders back, write study.json, study.md and the figures,
all on the metric of the runs' task (mIoU, top-1, ...)."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seg.study.aggregate import RunResult, load_run, summarize
from seg.study.config import REPO_ROOT, RunSpec, Study, plan_runs, plan_sweep_runs, study_task
from seg.study.figures import write_figures, write_sweep_figure
from seg.study.metrics import metric_for_task
from seg.study.report import write_report
from seg.study.runner import Outcome, inspect_run, run_all, threads_per_job
from seg.study.selection import extensions, picks, select

DEFAULT_ROOT = Path("checkpoints") / "studies"


@dataclass
class StudyResult:
    summary: dict[str, Any]
    files: list[Path]
    runs: list[RunResult]
    signum: int | None  # the signal that stopped the study, if one did
    selection_runs: list[RunResult] = field(default_factory=list)  # a sweep's, apart from the reported ``runs``

    @property
    def failed(self) -> list[RunResult]:
        """Runs (selection or reported) that ended without a result nor a divergence (diverged runs are results)."""
        return [r for r in [*self.selection_runs, *self.runs] if r.status not in ("finished", "diverged")]


def _shown(path: Path) -> str:
    """``path`` relative to the repository root when it is inside (as a study file names it)."""
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def default_out(study: Study) -> Path:
    return DEFAULT_ROOT / study.name


def plan(specs: list[RunSpec], log: Callable[[str], None]) -> list[tuple[RunSpec, bool]]:
    """The runs still to do, each with whether it resumes; says what is skipped and why."""
    todo = []
    for spec in specs:
        state = inspect_run(spec)  # raises before anything starts if a folder holds another experiment
        if state in ("done", "diverged"):
            log(f"skip {spec.label}: {'finished' if state == 'done' else 'diverged earlier'}")
        else:
            todo.append((spec, state == "resume"))
    return todo


def _run(specs: list[RunSpec], device: str, jobs: int, gpus: int, log: Callable[[str], None]
         ) -> tuple[dict[tuple[str, int], Outcome], int | None]:
    todo = plan(specs, log)
    if todo and jobs > 1:
        log(f"{jobs} runs at a time; each gets OMP_NUM_THREADS={threads_per_job(jobs)} (cores // jobs) unless "
            "OMP_NUM_THREADS is set" + ("; GPUs round robin" if device == "cuda" and gpus > 1 else ""))
    return run_all(todo, device, jobs, gpus, log) if todo else ({}, None)


def _load(specs: list[RunSpec], outcomes: dict[tuple[str, int], Outcome]) -> list[RunResult]:
    runs = []
    for spec in specs:
        o = outcomes.get(spec.key)
        runs.append(load_run(spec.variant, spec.seed, spec.work_dir, spec.cfg.train.iterations,
                             None if o is None else (o.status, o.message)))
    return runs


def run_study(
    study: Study,
    out: Path | None = None,
    cli_opts: list[str] | None = None,
    device: str = "cpu",
    jobs: int = 1,
    gpus: int = 0,
    log: Callable[[str], None] = print,
) -> StudyResult:
    """Run every (variant, seed) not yet finished and write the report; raises ConfigError up front for a bad
    study, a bad run config or a run folder trained with other settings.

    With a sweep, the selection runs come first; each variant whose selection runs all ended gets its pick, and
    only then are its reported runs planned (a variant still waiting for its selection has none yet)."""
    out = Path(out) if out is not None else default_out(study)
    selection_specs = plan_sweep_runs(study, out, cli_opts)
    if study.sweep is not None:  # check the reported runs' configs too before anything starts
        plan_runs(study, out, cli_opts, {v: vals[0] for v, vals in study.sweep.values.items()})
        specs: list[RunSpec] = []
    else:
        specs = plan_runs(study, out, cli_opts)
    outcomes, signum = _run(selection_specs, device, jobs, gpus, log)
    values = None if study.sweep is None else {v: list(vals) for v, vals in study.sweep.values.items()}
    announced: set[str] = set()
    while study.sweep is not None and signum is None:
        # Picks at an end of the range that may extend get one more value; the other picks are final, and their
        # reported runs train alongside the new selection runs (finished ones are skipped).
        task = study_task(study, selection_specs)
        selection = select(study, selection_specs, _load(selection_specs, outcomes), metric_for_task(task).key,
                           values)
        added = extensions(study, selection, values)
        final = {v: p for v, p in (picks(selection) or {}).items() if v not in added}
        for variant, value in final.items():
            if variant not in announced:
                log(f"picked {study.sweep.key}={value} for {variant} ({study.sweep.rule})")
                announced.add(variant)
        for variant, value in added.items():
            log(f"{variant}: best at an end of its values; adding {study.sweep.key}={value}")
            values[variant].append(value)
        new_specs = plan_sweep_runs(study, out, cli_opts, {v: [x] for v, x in added.items()})
        selection_specs += new_specs
        if added and not plan(new_specs, lambda _: None):  # trained in an earlier call: choose again first
            continue
        specs = plan_runs(study, out, cli_opts, final)
        more, signum = _run([*new_specs, *specs], device, jobs, gpus, log)
        outcomes.update(more)
        if not added:
            break
    if study.sweep is None and signum is None:
        more, signum = _run(specs, device, jobs, gpus, log)
        outcomes.update(more)
    return write_results(study, out, specs, outcomes, signum, cli_opts, selection_specs, values)


def write_results(study: Study, out: Path, specs: list[RunSpec], outcomes: dict[tuple[str, int], Outcome],
                  signum: int | None = None, cli_opts: list[str] | None = None,
                  selection_specs: list[RunSpec] | None = None, values: dict[str, list[Any]] | None = None
                  ) -> StudyResult:
    """Read every run folder back and write study.json, study.md and the figures into ``out``; with a sweep, its
    selection (``selection_specs``) too. The reported numbers use ``specs`` only."""
    selection_specs = selection_specs or []
    task = study_task(study, [*selection_specs, *specs])
    metric = metric_for_task(task)
    runs = _load(specs, outcomes)
    command = ["python", "tools/study.py", str(study.source), "--out", str(out)]
    header = {
        "name": study.name,
        "task": task,
        "base": _shown(study.base),
        "seeds": study.seeds,
        "opts": [*study.opts, *(cli_opts or [])],
        "out": str(out),
        "command": shlex.join(command + (["--opts", *cli_opts] if cli_opts else [])),
    }
    selection_runs = _load(selection_specs, outcomes)
    selection = select(study, selection_specs, selection_runs, metric.key, values)
    summary = summarize(header, study.baseline, study.variants, runs, metric, study.report_at)
    summary["sweep"] = selection
    files = list(write_report(summary, out))
    files += write_figures({v: [r for r in runs if r.variant == v] for v in study.variants}, out, study.name, metric)
    if selection is not None:
        files.append(write_sweep_figure(selection, out, study.name, metric))
    return StudyResult(summary, files, runs, signum, selection_runs)
