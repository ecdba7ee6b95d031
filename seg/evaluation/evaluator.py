"""``evaluate``: confusion-matrix metrics of a model over a data loader, in one process or many.

The same function serves the training loop's periodic validation and ``tools/eval.py``. Under
``torch.distributed`` every process scores its own shard and the matrices are summed; samples that a
``DistributedSampler`` repeats to even out the shards are skipped, so each image counts once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

from seg import distributed
from seg.data.labels import IGNORE_INDEX, NUM_CLASSES, REFERENCE_NUM_CLASSES, TRAIN_TO_REFERENCE_LUT
from seg.evaluation.metrics import ConfusionMatrix, nanmean
from seg.inference import Predictor

# The paper's code's scoring (NOT the Cityscapes benchmark): predictions and labels in its 21 ids (void is
# class 0 and counted, the 19 classes 1..19, 20 unused), IoU of absent classes taken as 0 and averaged over
# all 21, at short side 520 (its validation transform).
REFERENCE_SHORT_SIDE = 520
_TRAIN_TO_REFERENCE = torch.tensor(TRAIN_TO_REFERENCE_LUT.tolist(), dtype=torch.int64)


class ShardedEvalSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order, without padding (shards may differ by one)."""

    def __init__(self, dataset: Dataset, rank: int | None = None, world_size: int | None = None):
        self.rank = distributed.rank() if rank is None else rank
        self.world_size = distributed.world_size() if world_size is None else world_size
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


def real_batches(loader: DataLoader, progress: bool = False) -> Iterator[tuple[int, Any, Any]]:
    """``(offset, inputs, targets)`` of each batch this process scores, for every task's evaluation loop.

    A ``DistributedSampler``'s repeated padding samples are dropped, so each sample counts once over all
    processes, and a batch left empty is skipped; ``offset`` is the position of the batch's first sample in this
    process's share of the loader. ``progress``: a progress bar, on rank 0 only.
    """
    real = _real_count(loader)
    iterator: Any = loader
    if progress and distributed.is_main_process():
        from tqdm import tqdm

        iterator = tqdm(loader, desc="eval", unit="batch", dynamic_ncols=True)
    seen = 0
    for inputs, targets in iterator:
        if real is not None and seen + len(inputs) > real:  # drop the sampler's repeated samples
            keep = max(0, real - seen)
            inputs, targets = inputs[:keep], targets[:keep]
        offset, seen = seen, seen + len(inputs)
        if len(inputs):
            yield offset, inputs, targets


def to_reference_target(target: torch.Tensor) -> torch.Tensor:
    """trainIds (255 = void) -> the paper's code's ids (void 0, classes 1..19); see seg.data.labels."""
    return _TRAIN_TO_REFERENCE.to(target.device)[target.long().clamp(0, 255)]


def reference_ious(cm: ConfusionMatrix) -> list[float]:
    """IoU of every class with absent classes counted as 0, as the paper's code's ``ConfusionMatrix``."""
    h = cm.mat.double().cpu()
    tp = h.diag()
    union = h.sum(0) + h.sum(1) - tp
    return (tp / union.clamp(min=1)).tolist()


def reference_miou(cm: ConfusionMatrix) -> float:
    """Mean IoU over all classes with absent classes counted as 0 (the reference code's average)."""
    ious = reference_ious(cm)
    return sum(ious) / len(ious)


def benchmark_from_reference(cm: ConfusionMatrix) -> dict[str, Any]:
    """The 19-class metrics of predictions scored in the paper's 21 ids.

    Void pixels are left out; on a pixel of a class, a prediction of void or of the unused id is a miss of
    that class and a false positive of none, as cityscapesscripts counts a predicted void labelId. Keys as
    :meth:`ConfusionMatrix.compute`, over the 19 classes in trainId order.
    """
    h = cm.mat.cpu()
    cls = _TRAIN_TO_REFERENCE[:NUM_CLASSES]
    other = torch.tensor([i for i in range(h.shape[1]) if i not in set(cls.tolist())])
    n = NUM_CLASSES
    mat = torch.zeros(n + 1, n + 1, dtype=torch.int64)  # the last column: predictions of no class
    mat[:n, :n] = h[cls][:, cls]
    mat[:n, n] = h[cls][:, other].sum(1)
    folded = ConfusionMatrix(n + 1, ignore_index=None)
    folded.mat = mat
    res = folded.compute()
    iou, class_acc = torch.tensor(res["iou"][:n]), torch.tensor(res["class_acc"][:n])
    res.update(iou=iou.tolist(), class_acc=class_acc.tolist(), miou=nanmean(iou), macc=nanmean(class_acc))
    return res


def _resize_short_side(
    images: torch.Tensor, targets: torch.Tensor, short: int
) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = images.shape[-2:]
    scale = short / min(h, w)
    size = (round(h * scale), round(w * scale))
    # As PIL resizes in the paper's code: bilinear smoothed when shrinking, labels nearest by pixel centre.
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    targets = F.interpolate(targets[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()
    return images, targets


def outputs_reference_ids(predictor: Any) -> bool:
    """Whether a predictor's model has the paper's 21 outputs (and so predicts its ids)."""
    return getattr(predictor, "num_classes", None) == REFERENCE_NUM_CLASSES


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
    reference_targets: bool = False,
    progress: bool = False,
    on_batch: Callable[[list[int] | None, torch.Tensor, torch.Tensor], None] | None = None,
) -> dict[str, Any]:
    """Score ``model`` (or a ready ``seg.inference.Predictor``) on ``loader``'s (image, mask) batches.

    Images are normalised tensors N,3,H,W; masks int64 N,H,W with ``ignore_index`` for unlabelled pixels.
    Predictions are made at the loader's resolution (full resolution for the standard val transform).
    ``on_batch(indices, pred, target)`` sees every scored batch (``indices``: dataset indices, or ``None``
    when the sampler shuffles; ``pred`` and ``target`` in the ids scored). Returns
    ``ConfusionMatrix.compute()`` plus ``num_images``.

    Scoring in the paper's code's 21 ids happens when ``reference_compat`` asks for it (images then resized
    to short side 520 unless they are), when the masks already are in those ids (``reference_targets``:
    void 0, classes 1..19, 255 = padding) or when the model has 21 outputs; 19-output predictions and
    trainId masks are mapped into them. Then ``miou``, ``iou``, ``acc``, ``macc`` stay the 19-class metrics
    of the same predictions (:func:`benchmark_from_reference`), and ``miou_reference`` (the mean of all
    21 IoUs), ``iou_reference``, ``acc_reference`` and a ``note`` are added; ``confusion_matrix`` is 21x21.
    The model's train/eval mode is restored afterwards.
    """
    if predictor is None:
        if model is None:
            raise ValueError("evaluate needs a model or a predictor")
        predictor = Predictor(
            model, device=device, amp_dtype=amp_dtype, batch_size=max(1, loader.batch_size or 1)
        )
    reference_outputs = outputs_reference_ids(predictor)
    reference = reference_compat or reference_targets or reference_outputs
    if reference:
        cm = ConfusionMatrix(REFERENCE_NUM_CLASSES, IGNORE_INDEX, device=predictor.device)
    else:
        cm = ConfusionMatrix(num_classes, ignore_index, device=predictor.device)

    indices = _sample_indices(loader) if on_batch is not None else None
    seen = 0
    for offset, images, targets in real_batches(loader, progress):
        batch_idx = indices[offset : offset + len(images)] if indices is not None else None
        seen += len(images)
        targets = targets.to(predictor.device, non_blocking=True)
        if reference_compat and min(images.shape[-2:]) != REFERENCE_SHORT_SIDE:
            images, targets = _resize_short_side(images, targets, REFERENCE_SHORT_SIDE)
        if reference and not reference_targets:
            targets = to_reference_target(targets)
        pred = predictor.predict_tensor(images)
        if reference and not reference_outputs:
            pred = to_reference_target(pred)  # a 19-output model never predicts void
        cm.update(pred, targets)
        if on_batch is not None:
            on_batch(batch_idx, pred, targets)

    cm.reduce_from_all_processes()
    num_images = distributed.sum_counts(torch.tensor([seen]))
    result = benchmark_from_reference(cm) if reference else cm.compute()
    if reference:
        result["miou_reference"] = reference_miou(cm)
        result["iou_reference"] = reference_ious(cm)
        plain = cm.compute()
        result["acc_reference"], result["class_acc_reference"] = plain["acc"], plain["class_acc"]
        result["note"] = (
            "miou: the 19 classes, void pixels left out (a void prediction is a miss); miou_reference: the "
            "paper's code's mean of 21 IoUs, void a class, class 20 never a label: NOT the benchmark metric"
        )
    result["num_images"] = int(num_images.item())
    result["confusion_matrix"] = cm.mat.cpu().tolist()
    return result
