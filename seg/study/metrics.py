"""Which validation numbers a study compares: the task's own metric (``Task.metric``, the one that picks
``best.pth``: mIoU for segmentation, top-1 for classification) and the secondary one the task names
(``Task.secondary_metric``) shown next to it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from seg.tasks import TASKS


@dataclass(frozen=True)
class StudyMetric:
    """``key``/``label``: the primary metric (means, intervals, paired differences, convergence, figures);
    ``secondary``: a second number averaged per variant (None for a task without one)."""

    key: str
    label: str
    secondary: str | None = None
    secondary_label: str | None = None
    extra: tuple[str, ...] = ()

    @property
    def finals(self) -> tuple[str, ...]:
        """The val-record keys each run row of study.json holds as ``final_<key>``."""
        return (self.key, *((self.secondary,) if self.secondary else ()), *self.extra)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "extra": list(self.extra)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyMetric:
        return cls(**{**data, "extra": tuple(data.get("extra", ()))})


def metric_for_task(task: str) -> StudyMetric:
    """The metrics a study of ``task`` (a key of :data:`seg.tasks.TASKS`) compares."""
    cls = TASKS[task]
    return StudyMetric(cls.metric, cls.metric_label, cls.secondary_metric, cls.secondary_label, cls.extra_metrics)


# What a study.json written before studies recorded their metric compares: those were all segmentation studies
# (seg/study/report.py reads old summaries with it; the functions that take a metric default to it).
SEGMENTATION = metric_for_task("segmentation")
