"""Studies: the same training config under several variants and seeds, run as ordinary training runs, then
compared with intervals over seeds on the task's metric (study file format: studies/README.md)."""

from seg.study.aggregate import RunResult, load_run, read_metrics, summarize
from seg.study.config import RunSpec, Study, Sweep, load_study, plan_runs, plan_sweep_runs, study_task
from seg.study.metrics import StudyMetric, metric_for_task
from seg.study.pipeline import StudyResult, default_out, run_study, write_results
from seg.study.selection import select
from seg.study.stats import Estimate, estimate, paired_differences, t_quantile

__all__ = [
    "Estimate",
    "RunResult",
    "RunSpec",
    "Study",
    "Sweep",
    "StudyMetric",
    "StudyResult",
    "default_out",
    "estimate",
    "load_run",
    "load_study",
    "metric_for_task",
    "paired_differences",
    "plan_runs",
    "plan_sweep_runs",
    "read_metrics",
    "run_study",
    "select",
    "study_task",
    "summarize",
    "t_quantile",
    "write_results",
]
