"""The task seam: what differs between segmentation and classification, behind one small interface.

The training loop (:mod:`seg.engine.trainer`) knows only :class:`Task`: it asks the task for datasets, a
model, the loss of a batch and validation metrics, and never looks at what the targets are. A task also owns
its config rules (:meth:`Task.check_config`) and its checkpoint evaluation (:meth:`Task.build_eval_dataset`,
:meth:`Task.summary`, used by ``tools/eval.py``); :func:`register_task` makes ``task: <name>`` valid.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from seg.config import Config, register_task_rules
from seg.distributed import is_main_process, world_size
from seg.errors import UserError
from seg.evaluation import build_eval_loader
from seg.events import Event
from seg.nn import fold_deconv


class DataRootError(UserError):
    """The configured dataset is missing or unusable (the dataset's message plus what to do)."""


@dataclass
class EvalRequest:
    """What ``tools/eval.py`` asks of a checkpoint evaluation: the task-independent part of its command line,
    and ``options``, the task's own options (:meth:`Task.add_eval_arguments`) by name."""

    config_path: str
    checkpoint: str
    split: str
    out_dir: Path
    device: torch.device
    fold: bool = True  # eval-mode deconvolution folded into plain convs (the same outputs, faster)
    batch_size: int | None = None  # default: eval.batch_size
    num_workers: int | None = None  # default: data.num_workers
    options: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """One kind of training problem. ``metric`` names the validation value that picks ``best.pth``."""

    name: str  # the config's ``task:`` value
    metric: str  # key in the validation metrics
    metric_label: str  # how logs name it
    # What a study shows next to ``metric`` (seg/study): a second validation value and its label, and further
    # validation keys copied per run into study.json.
    secondary_metric: str | None = None
    secondary_label: str | None = None
    extra_metrics: tuple[str, ...] = ()

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @classmethod
    @abstractmethod
    def check_config(cls, cfg: Config) -> None:
        """The task's rules on a config (e.g. which ``model.arch``, ``data.dataset`` and ``train.loss`` it
        takes); run by :class:`seg.config.Config` on every config of this task. Raises a one-line
        :class:`~seg.config.ConfigError` naming the key, its value and what was expected."""

    @abstractmethod
    def build_datasets(self) -> tuple[Dataset, Dataset]:
        """(train, val) datasets of ``(input, target)`` samples; raises :class:`DataRootError`."""

    @abstractmethod
    def build_model(self, *, load_pretrained: bool = True) -> nn.Module:
        """The model of ``cfg.model`` (synced statistics and SyncBatchNorm under a process group);
        ``load_pretrained=False`` skips ``model.pretrained`` (the weights come from a checkpoint)."""

    @abstractmethod
    def build_eval_dataset(self, split: str) -> Dataset:
        """The ``split`` of ``cfg.data`` as validation sees it (no augmentation), for ``tools/eval.py``."""

    @abstractmethod
    def loss(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch (computed in float32)."""

    @abstractmethod
    def evaluate(
        self, model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None,
        *, progress: bool = False,
    ) -> dict[str, Any]:
        """Validation metrics over ``loader`` (every sample counted once across processes); holds ``metric``.
        ``progress``: a progress bar on the main process (``tools/eval.py``)."""

    @abstractmethod
    def val_event(self, iteration: int, metrics: dict[str, Any], model: nn.Module, device: torch.device) -> Event:
        """What the writers record of a validation (rank 0 only)."""

    @classmethod
    def format_metric(cls, value: float) -> str:
        """A value of ``metric`` as the tools print it (default: a fraction shown as a percentage, 65.10)."""
        return f"{100 * value:.2f}"

    def summary(self, metrics: dict[str, Any]) -> str:
        """What ``tools/eval.py`` prints of :meth:`evaluate`'s metrics (default: the task's metric)."""
        return f"{self.metric_label} {self.format_metric(metrics[self.metric])}"

    @classmethod
    def add_eval_arguments(cls, parser: argparse.ArgumentParser) -> list[str]:
        """Add the task's own ``tools/eval.py`` options to ``parser``; returns their names (argparse ``dest``).
        Default: none."""
        return []

    def evaluate_checkpoint(self, model: nn.Module, trained: Config, request: EvalRequest) -> dict[str, Any]:
        """``tools/eval.py``: ``model`` (rebuilt from ``trained``, the checkpoint's config) on ``request.split``
        of this task's data, each sample once across processes; prints the summary and returns the report that
        goes to ``metrics.json`` (empty on processes other than the main one).

        Default: :meth:`evaluate` with the checkpoint's model settings (its classes) and this config's data.
        """
        task = type(self)(dataclasses.replace(self.cfg, model=trained.model))
        dataset = task.build_eval_dataset(request.split)
        workers = self.cfg.data.num_workers if request.num_workers is None else request.num_workers
        loader = build_eval_loader(dataset, batch_size=request.batch_size or self.cfg.eval.batch_size,
                                   num_workers=workers)
        if request.fold:
            model = fold_deconv(model)
        if is_main_process():
            request.out_dir.mkdir(parents=True, exist_ok=True)
            print(f"evaluating {request.checkpoint} on {self.cfg.data.dataset} at {self.cfg.data.root} "
                  f"[{request.split}]: {len(dataset)} images, {world_size()} process(es) on {request.device}")
        start = time.perf_counter()
        metrics = task.evaluate(model, loader, request.device, None, progress=True)
        elapsed = time.perf_counter() - start
        if not is_main_process():
            return {}
        print(task.summary(metrics))
        return {"checkpoint": str(request.checkpoint), "split": request.split, "dataset": self.cfg.data.dataset,
                "seconds": round(elapsed, 2), "metrics": metrics}

    def limit_val(self, val_set: Dataset) -> Dataset:
        """The first ``train.val_max_images`` samples of ``val_set`` (all when unset): what the loop validates on."""
        limit = self.cfg.train.val_max_images
        return val_set if limit is None else Subset(val_set, range(min(limit, len(val_set))))

    def to_device(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A loader batch as (inputs, targets) on ``device``."""
        inputs, targets = batch
        return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True).long()


TASKS: dict[str, type[Task]] = {}
T = TypeVar("T", bound=type[Task])


def register_task(cls: T) -> T:
    """Class decorator: ``task: <cls.name>`` builds ``cls``, and ``cls.check_config`` checks its configs."""
    TASKS[cls.name] = cls
    register_task_rules(cls.name, cls.check_config)
    return cls
