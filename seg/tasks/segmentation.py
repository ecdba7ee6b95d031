"""Semantic segmentation (Cityscapes layout): pixel cross-entropy, mIoU over the classes, images in TensorBoard."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from seg.config import Config, ConfigError, check_choice
from seg.data import CityscapesDataset, DatasetError, build_transforms
from seg.data.labels import CLASS_NAMES, reference_to_train
from seg.evaluation import evaluate
from seg.events import Event
from seg.inference import Predictor
from seg.models import build_model
from seg.models.build import ARCHS
from seg.tasks import segmentation_eval
from seg.tasks.base import DataRootError, EvalRequest, Task, register_task
from seg.tasks.pixel_loss import pixel_loss
from seg.visualize import colorize

DEMO_HINT = (
    "Set data.root (e.g. --opts data.root=/path/to/cityscapes) to a Cityscapes folder, or try the project "
    "without a download: `make demo` generates a synthetic Cityscapes and trains on it."
)


def denormalize(image: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """A normalised 3xHxW tensor back to an HxWx3 uint8 RGB array."""
    img = image.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


DATASETS = ("cityscapes",)  # data.dataset: the Cityscapes layout (real, or the synthetic stand-in)
LOSSES = ("ce", "ohem")  # train.loss: seg/tasks/pixel_loss.py


@register_task
class SegmentationTask(Task):
    name = "segmentation"
    metric = "miou"
    metric_label = "mIoU"
    secondary_metric, secondary_label, extra_metrics = "acc", "pixel acc", ("macc",)
    _class_weights: torch.Tensor | None = None  # train.class_weights on the device, made at the first step

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        check_choice("model.arch", cfg.model.arch, ARCHS)
        check_choice("data.dataset", cfg.data.dataset, DATASETS)
        if cfg.data.label_mapping == "reference" and cfg.model.num_classes != 21:
            raise ConfigError(f"key 'model.num_classes' has value {cfg.model.num_classes} with "
                              f"data.label_mapping 'reference', expected 21 (void, 19 classes, one unused)")
        if cfg.train.loss not in LOSSES:
            raise ConfigError(f"key 'train.loss' has value {cfg.train.loss!r}; segmentation trains with "
                              "a pixel loss, expected 'ce' or 'ohem'")
        weights = cfg.train.class_weights
        if weights is not None and len(weights) != cfg.model.num_classes:
            raise ConfigError(f"key 'train.class_weights' has {len(weights)} values, expected one per class "
                              f"(model.num_classes {cfg.model.num_classes})")

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        data = self.cfg.data
        try:
            labels = data.label_mapping
            train_set = CityscapesDataset(data.root, data.train_split, build_transforms(data, train=True), labels)
            val_set = CityscapesDataset(data.root, data.val_split, build_transforms(data, train=False), labels)
        except DatasetError as e:
            raise DataRootError(f"{e}\n\n{DEMO_HINT}") from e
        self.val_set = self.limit_val(val_set)
        return train_set, self.val_set

    def build_model(self, *, load_pretrained: bool = True) -> nn.Module:
        return build_model(self.cfg.model, load_pretrained=load_pretrained)

    def build_eval_dataset(self, split: str) -> Dataset:
        data = self.cfg.data
        try:
            return CityscapesDataset(data.root, split, build_transforms(data, train=False), data.label_mapping)
        except DatasetError as e:
            raise DataRootError(f"{e}\n\n{DEMO_HINT}") from e

    def summary(self, metrics: dict[str, Any]) -> str:
        return f"mIoU {100 * metrics['miou']:.2f}  pixel acc {100 * metrics['acc']:.2f}"

    @classmethod
    def add_eval_arguments(cls, parser: argparse.ArgumentParser) -> list[str]:
        return segmentation_eval.add_eval_arguments(parser)

    def evaluate_checkpoint(self, model: nn.Module, trained: Config, request: EvalRequest) -> dict[str, Any]:
        # The Cityscapes evaluation: full resolution, TTA, the official evaluator (seg/tasks/segmentation_eval.py).
        return segmentation_eval.evaluate_checkpoint(self.cfg, model, trained, request)

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        t = self.cfg.train
        weights = None
        if t.class_weights is not None:
            if self._class_weights is None or self._class_weights.device != targets.device:
                self._class_weights = torch.tensor(t.class_weights, dtype=torch.float32, device=targets.device)
            weights = self._class_weights

        def one(logits: torch.Tensor) -> torch.Tensor:
            return pixel_loss(logits, targets, ignore_index=t.ignore_index, kind=t.loss, class_weights=weights,
                              ohem_thresh=t.ohem_thresh, ohem_min_kept=t.ohem_min_kept)

        loss = one(outputs["out"])
        if "aux" in outputs and t.aux_weight > 0:
            loss = loss + t.aux_weight * one(outputs["aux"])
        return loss

    def _predictor(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> Predictor:
        ev, data = self.cfg.eval, self.cfg.data
        return Predictor(
            model, mean=data.mean, std=data.std, mode=ev.mode, crop_size=ev.crop_size, stride=ev.stride,
            device=device, amp_dtype=amp_dtype, batch_size=ev.batch_size,
        )

    def evaluate(
        self, model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None,
        *, progress: bool = False,
    ) -> dict[str, Any]:
        predictor = self._predictor(model, device, amp_dtype)
        return evaluate(
            model, loader, device, num_classes=self.cfg.model.num_classes,
            ignore_index=self.cfg.train.ignore_index, predictor=predictor,
            reference_compat=self.cfg.eval.reference_compat,
            reference_targets=self.cfg.data.label_mapping == "reference", progress=progress,
        )

    def val_event(self, iteration: int, metrics: dict[str, Any], model: nn.Module, device: torch.device) -> Event:
        n = len(metrics["iou"])  # 19 also for a model with the paper's 21 outputs (see evaluate)
        names = CLASS_NAMES if n == len(CLASS_NAMES) else [str(i) for i in range(n)]
        scalars = {"val/mIoU": metrics["miou"], "val/pixel_acc": metrics["acc"], "val/mean_acc": metrics["macc"]}
        # NaN IoU: the class is absent from the split and has no curve.
        scalars.update({f"val_iou/{k}": v for k, v in zip(names, metrics["iou"], strict=True) if v == v})
        record = {"miou": metrics["miou"], "acc": metrics["acc"], "macc": metrics["macc"], "iou": metrics["iou"]}
        line = f"val @ {iteration}: mIoU {100 * metrics['miou']:.2f}  pixel acc {100 * metrics['acc']:.2f}"
        if "miou_reference" in metrics:
            # The paper's code's number (21 classes, void counted), NOT the benchmark's; kept apart by name.
            scalars["val/mIoU_reference21"] = metrics["miou_reference"]
            record.update(miou_reference=metrics["miou_reference"], iou_reference=metrics["iou_reference"])
            line = (f"val @ {iteration}: mIoU {100 * metrics['miou']:.2f} (19 classes)  reference mIoU "
                    f"{100 * metrics['miou_reference']:.2f} (paper's code: 21 classes, void counted; not the "
                    f"benchmark)  pixel acc {100 * metrics['acc']:.2f}")
        return Event("val", iteration, record=record, scalars=scalars, images=self._images(model, device), line=line)

    @torch.no_grad()
    def _images(self, model: nn.Module, device: torch.device) -> dict[str, np.ndarray]:
        """Input, ground truth and prediction of the first validation image, in the Cityscapes palette."""
        image, mask = self.val_set[0]
        pred = self._predictor(model, device, None).predict_tensor(image[None])[0].cpu().numpy()
        data = self.cfg.data
        if data.label_mapping == "reference":  # drawn in the Cityscapes palette: void and unused black
            mask, pred = reference_to_train(np.asarray(mask)), reference_to_train(pred)
        return {
            "val/input": denormalize(image, data.mean, data.std),
            "val/ground_truth": colorize(np.asarray(mask, dtype=np.int64)),
            "val/prediction": colorize(pred),
        }
