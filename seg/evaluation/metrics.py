"""Confusion-matrix segmentation metrics: IoU per class, mIoU, pixel and mean class accuracy.

Rows of the matrix are ground truth, columns predictions. A class whose union (TP + FP + FN) is empty
has IoU NaN and is left out of the mean, as the Cityscapes evaluator does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from seg.distributed import sum_counts


class ConfusionMatrix:
    """Accumulates a ``num_classes x num_classes`` int64 matrix; pixels labelled ``ignore_index`` are skipped.

    ``ignore_index=None`` counts every pixel (the reference-compatible mode, where void is a class).
    """

    def __init__(
        self, num_classes: int = 19, ignore_index: int | None = 255, device: str | torch.device = "cpu"
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` are integer tensors of the same shape (any layout)."""
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError(f"expected integer class maps, got {pred.dtype} and {target.dtype}")
        n = self.num_classes
        pred = pred.reshape(-1).to(self.mat.device, torch.int64)
        target = target.reshape(-1).to(self.mat.device, torch.int64)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = pred[keep], target[keep]
        if target.numel() == 0:
            return
        # Out-of-range ids would silently land in a neighbouring cell of the flattened bincount.
        for name, t in (("target", target), ("prediction", pred)):
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= n:
                raise ValueError(
                    f"{name} contains class id {lo if lo < 0 else hi}; expected 0..{n - 1}"
                    + (
                        f" or ignore index {self.ignore_index}"
                        if name == "target" and self.ignore_index is not None
                        else ""
                    )
                )
        self.mat += torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)

    def reduce_from_all_processes(self) -> None:
        """Sum the matrices of all processes (no-op outside ``torch.distributed``)."""
        self.mat = sum_counts(self.mat)

    def compute(self) -> dict[str, Any]:
        """Metrics as plain Python floats: miou, iou (list, NaN for absent classes), acc, macc, class_acc."""
        h = self.mat.double().cpu()
        tp = h.diag()
        gt = h.sum(1)
        predicted = h.sum(0)
        union = gt + predicted - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        class_acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
        total = h.sum()
        return {
            "miou": nanmean(iou),
            "iou": iou.tolist(),
            "acc": float(tp.sum() / total) if total > 0 else float("nan"),
            "macc": nanmean(class_acc),
            "class_acc": class_acc.tolist(),
            "num_pixels": int(total),
        }


def nanmean(x: torch.Tensor) -> float:
    """The mean of the non-NaN entries (NaN when there are none)."""
    valid = ~torch.isnan(x)
    return float(x[valid].mean()) if valid.any() else float("nan")


def format_table(metrics: dict[str, Any], class_names: Sequence[str] | None = None, title: str = "") -> str:
    """A readable per-class table (IoU and accuracy in percent) followed by the summary line."""
    iou = metrics["iou"]
    acc = metrics.get("class_acc", [float("nan")] * len(iou))
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    if len(names) != len(iou):
        raise ValueError(f"{len(names)} class names given for {len(iou)} classes")

    def pct(v: float) -> str:
        return "   n/a" if math.isnan(v) else f"{100 * v:6.2f}"

    width = max(12, *(len(n) for n in names))
    lines = [title] if title else []
    lines.append(f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}")
    lines.append("-" * (width + 16))
    lines += [f"{n:<{width}}  {pct(i)}  {pct(a)}" for n, i, a in zip(names, iou, acc, strict=True)]
    lines.append("-" * (width + 16))
    lines.append(
        f"mIoU {pct(metrics['miou']).strip()}  pixel acc {pct(metrics['acc']).strip()}  "
        f"mean acc {pct(metrics['macc']).strip()}"
    )
    return "\n".join(lines)
