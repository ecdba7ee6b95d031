"""Top-k accuracy of a classifier over a data loader, in one process or many (the classification task's metric).

The counts (images, correct at each k) are summed over processes with one ``all_reduce``, so each image of
the split counts once whether one process scores it all or ``torchrun`` shards it
(:func:`seg.evaluation.build_eval_loader`); a ``DistributedSampler``'s repeated padding samples are dropped,
as in :func:`seg.evaluation.evaluate`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from seg.distributed import sum_counts
from seg.evaluation.evaluator import real_batches

# The metrics the classification task reports; k above the number of classes is clipped (top-5 of a
# 2-class problem is top-2, i.e. 1.0).
TOPK = (1, 5)

Reduce = Callable[[torch.Tensor], None]


def _dist_sum(t: torch.Tensor) -> None:
    """Sum ``t`` in place over the default process group (nothing to do in one process)."""
    summed = sum_counts(t)
    if summed is not t:
        t.copy_(summed)


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = TOPK) -> torch.Tensor:
    """How many rows of ``logits`` (N x C) have their target among the ``k`` highest scores, per k (int64).

    ``k`` larger than C is clipped to C. Ties are broken as ``torch.topk`` does.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits N x C and targets N, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # N x kmax, best first
    hit = top == targets[:, None]
    return torch.stack([hit[:, : min(k, kmax)].any(1).sum() for k in ks]).long()


class TopKAccuracy:
    """Running counts of images and top-k hits; :meth:`reduce` sums them over processes.

    Args:
        ks: the k of each accuracy (default top-1 and top-5).
        device: where the counts live (on CUDA under NCCL).
        all_reduce: sums a tensor in place over processes; default ``torch.distributed.all_reduce`` when a
            process group of more than one process exists (tests pass their own).
    """

    def __init__(self, ks: Sequence[int] = TOPK, device: str | torch.device = "cpu",
                 all_reduce: Reduce | None = None) -> None:
        if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"ks must be positive ints, got {ks!r}")
        self.ks = tuple(ks)
        self.counts = torch.zeros(1 + len(self.ks), dtype=torch.int64, device=device)  # images, hits per k
        self.all_reduce = all_reduce or _dist_sum

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        hits = topk_correct(logits, targets.to(logits.device), self.ks).to(self.counts.device)
        self.counts += torch.cat([hits.new_tensor([len(targets)]), hits])

    def reduce(self) -> None:
        """Sum the counts over all processes (call once, on every process)."""
        self.all_reduce(self.counts)

    def compute(self) -> dict[str, Any]:
        """``{"top<k>": fraction, ..., "num_images": n}``; fractions are 0.0 when no image was scored."""
        n, *hits = self.counts.tolist()
        result: dict[str, Any] = {f"top{k}": (h / n if n else 0.0) for k, h in zip(self.ks, hits, strict=True)}
        result["num_images"] = n
        return result


@torch.no_grad()
def evaluate_classification(
    model: nn.Module,
    loader: DataLoader,
    device: str | torch.device,
    amp_dtype: torch.dtype | None = None,
    *,
    ks: Sequence[int] = TOPK,
    progress: bool = False,
    all_reduce: Reduce | None = None,
) -> dict[str, Any]:
    """Top-k accuracies of ``model`` (logits N x C) over ``loader``'s (image, label) batches.

    Every process must call it (the counts are summed over processes). Returns ``top1``, ``top5`` (or the
    ``ks`` asked for) as fractions and ``num_images``. The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    meter = TopKAccuracy(ks, device=device, all_reduce=all_reduce)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    try:
        for _, images, targets in real_batches(loader, progress):
            with autocast:
                logits = model(images.to(device, non_blocking=True))
            meter.update(logits.float(), targets.to(device, non_blocking=True).long())
    finally:
        model.train(was_training)
    meter.reduce()
    return meter.compute()
