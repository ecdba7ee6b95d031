"""Training tasks: each says how to build data, model, loss and metrics for the one training loop.

Every module of this package is imported here, so a task registers itself (:func:`register_task` on its class)
by living in ``seg/tasks/``; importing ``seg.tasks`` makes every task's config rules known to ``seg.config``.
"""

import importlib
import pkgutil

from torch import nn

from seg.config import Config
from seg.tasks.base import TASKS, DataRootError, EvalRequest, Task, register_task

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_task(cfg: Config) -> Task:
    """The task named by ``cfg.task`` (the config checks the name)."""
    return TASKS[cfg.task](cfg)


def untrained_model(cfg: Config) -> nn.Module:
    """The model ``cfg`` describes, without ``model.pretrained``: what a checkpoint's weights are loaded into
    (the ``build`` of :func:`seg.models.model_from_checkpoint`)."""
    return build_task(cfg).build_model(load_pretrained=False)


__all__ = ["TASKS", "DataRootError", "EvalRequest", "Task", "build_task", "register_task", "untrained_model"]
