"""``evaluate``: confusion-matrix metrics of a model over a data loader, in one process or many.

The same function serves the training loop's periodic validation and ``tools/eval.py``. Under
``torch.distributed`` every process scores its own shard and the matrices are summed; samples that a
``DistributedSampler`` repeats to even out the shards are skipped, so each image counts once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

from seg.evaluation.metrics import ConfusionMatrix
from seg.inference import Predictor

# Reference-compatible scoring (NOT the Cityscapes benchmark): void is class 0, the 19 classes are 1..19,
# 21 outputs, every pixel counted, IoU of absent classes taken as 0 and averaged over all 21.
REFERENCE_NUM_CLASSES = 21
REFERENCE_SHORT_SIDE = 520


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedEvalSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order, without padding (shards may differ by one)."""

    def __init__(self, dataset: Dataset, rank: int | None = None, world_size: int | None = None):
        r, w = _dist_info()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        self.length = len(dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def build_eval_loader(
    dataset: Dataset, batch_size: int = 1, num_workers: int = 2, **kwargs: Any
) -> DataLoader:
    """A loader that visits each sample exactly once across all processes, in dataset order."""
    sampler = ShardedEvalSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        **kwargs,
    )


def _sample_indices(loader: DataLoader) -> list[int] | None:
    """Dataset indices this process sees, in order, or ``None`` when the sampler is not deterministic."""
    sampler = loader.sampler
    if isinstance(sampler, (SequentialSampler, ShardedEvalSampler)):
        return list(iter(sampler))
    if isinstance(sampler, DistributedSampler) and not sampler.shuffle:
        return list(iter(sampler))
    return None


def _real_count(loader: DataLoader) -> int | None:
    """How many leading samples of this process are real, when a DistributedSampler pads its shard."""
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
        n = len(sampler.dataset)  # type: ignore[arg-type]
        # The padded list is indices[:n] + repeats; this rank takes positions rank, rank + world, ...
        return len(range(sampler.rank, n, sampler.num_replicas))
    return None


def to_reference_target(target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """trainIds with ``ignore_index`` -> reference ids: void 0, classes 1..19."""
    return torch.where(target == ignore_index, torch.zeros_like(target), target + 1)


def reference_miou(cm: ConfusionMatrix) -> float:
    """Mean IoU over all classes with absent classes counted as 0 (the reference code's average)."""
    h = cm.mat.double().cpu()
    tp = h.diag()
    union = h.sum(0) + h.sum(1) - tp
    return float((tp / union.clamp(min=1)).mean())


def _resize_short_side(
    images: torch.Tensor, targets: torch.Tensor, short: int
) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = images.shape[-2:]
    scale = short / min(h, w)
    size = (round(h * scale), round(w * scale))
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    targets = F.interpolate(targets[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return images, targets


@torch.no_grad()
def evaluate(
    model: nn.Module | None,
    loader: DataLoader,
    device: str | torch.device,
    num_classes: int = 19,
    ignore_index: int = 255,
    amp_dtype: torch.dtype | None = None,
    *,
    predictor: Any = None,
    reference_compat: bool = False,
    progress: bool = False,
    on_batch: Callable[[list[int] | None, torch.Tensor, torch.Tensor], None] | None = None,
) -> dict[str, Any]:
    """Score ``model`` (or a ready ``seg.inference.Predictor``) on ``loader``'s (image, mask) batches.

    Images are normalised tensors N,3,H,W; masks int64 N,H,W with ``ignore_index`` for unlabelled pixels.
    Predictions are made at the loader's resolution (full resolution for the standard val transform).
    ``on_batch(indices, pred, target)`` sees every scored batch (``indices``: dataset indices, or ``None``
    when the sampler shuffles). Returns ``ConfusionMatrix.compute()`` plus ``num_images``; with
    ``reference_compat`` the keys are those of the 21-class reference scoring (``miou`` = reference mIoU).
    The model's train/eval mode is restored afterwards.
    """
    if predictor is None:
        if model is None:
            raise ValueError("evaluate needs a model or a predictor")
        predictor = Predictor(
            model, device=device, amp_dtype=amp_dtype, batch_size=max(1, loader.batch_size or 1)
        )
    n_cls = REFERENCE_NUM_CLASSES if reference_compat else num_classes
    cm = ConfusionMatrix(n_cls, None if reference_compat else ignore_index, device=predictor.device)

    indices = _sample_indices(loader) if on_batch is not None else None
    real = _real_count(loader)
    rank, _ = _dist_info()
    iterator = loader
    if progress and rank == 0:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="eval", unit="batch", dynamic_ncols=True)

    seen = 0
    for images, targets in iterator:
        if real is not None and seen + len(images) > real:  # drop the sampler's repeated samples
            keep = max(0, real - seen)
            images, targets = images[:keep], targets[:keep]
        batch_idx = indices[seen : seen + len(images)] if indices is not None else None
        seen += len(images)
        if len(images) == 0:
            continue
        targets = targets.to(predictor.device, non_blocking=True)
        if reference_compat:
            images, targets = _resize_short_side(images, targets, REFERENCE_SHORT_SIDE)
            targets = to_reference_target(targets, ignore_index)
        pred = predictor.predict_tensor(images)
        if reference_compat and getattr(predictor, "num_classes", None) != REFERENCE_NUM_CLASSES:
            pred = pred + 1  # a 19-output model never predicts void
        cm.update(pred, targets)
        if on_batch is not None:
            on_batch(batch_idx, pred, targets)

    cm.reduce_from_all_processes()
    num_images = torch.tensor([seen if real is None else min(seen, real)], device=cm.mat.device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        num_images = num_images.to(cm.mat.device if dist.get_backend() != "nccl" else "cuda")
        dist.all_reduce(num_images)
    result = cm.compute()
    if reference_compat:
        result["miou_benchmark_like"] = result["miou"]
        result["miou"] = reference_miou(cm)
        result["note"] = (
            "reference-compatible scoring (21 classes, void = class 0, short side 520): NOT the benchmark"
        )
    result["num_images"] = int(num_images.item())
    result["confusion_matrix"] = cm.mat.cpu().tolist()
    return result
