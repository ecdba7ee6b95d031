"""Training tasks: each says how to build data, model, loss and metrics for the one training loop."""

from seg.config import Config
from seg.tasks.base import DataRootError, Task
from seg.tasks.classification import ClassificationTask
from seg.tasks.segmentation import SegmentationTask

TASKS: dict[str, type[Task]] = {"segmentation": SegmentationTask, "classification": ClassificationTask}


def build_task(cfg: Config) -> Task:
    """The task named by ``cfg.task`` (the config checks the name)."""
    return TASKS[cfg.task](cfg)


__all__ = ["TASKS", "ClassificationTask", "DataRootError", "SegmentationTask", "Task", "build_task"]
