"""The segmentation task's pixel losses: cross-entropy, optionally class-weighted or with online hard example mining.

OHEM follows mmsegmentation's ``OHEMPixelSampler`` (the sampler its Cityscapes configs use): under ``no_grad``,
take the softmax probability of each valid pixel's true class; the threshold is ``max(thresh, p_(k))``
where ``p_(k)`` is the ``min_kept``-th smallest of those probabilities over the whole batch; pixels below the
threshold are kept. One deviation, on purpose: the loss is the (class-weighted) mean over the kept pixels,
whereas mmsegmentation averages the masked loss over every pixel of the batch, which makes the loss scale (and
so the effective learning rate) fall as training finds fewer hard pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hard_pixel_mask(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, thresh: float,
                    min_kept: int) -> torch.Tensor:
    """Boolean ``N×H×W`` mask of the pixels OHEM trains on (never an ignored one)."""
    with torch.no_grad():
        valid = targets != ignore_index
        num_valid = int(valid.sum())  # one host read per step: the k-th value needs the count
        if num_valid == 0:
            return valid
        prob = logits.float().softmax(dim=1)
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        p_true = prob.gather(1, safe.unsqueeze(1)).squeeze(1)
        threshold = torch.tensor(thresh, dtype=p_true.dtype, device=p_true.device)
        if min_kept > 0:
            k = min(min_kept, num_valid)
            kth = p_true[valid].kthvalue(k).values
            threshold = torch.maximum(threshold, kth)
        # <= keeps the k-th pixel itself, so at least min(min_kept, valid) pixels are kept even when many tie.
        return valid & (p_true <= threshold)


def pixel_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int,
    kind: str = "ce",
    class_weights: torch.Tensor | None = None,
    ohem_thresh: float = 0.7,
    ohem_min_kept: int = 0,
) -> torch.Tensor:
    """Mean pixel loss of ``N×C×H×W`` logits against ``N×H×W`` labels.

    ``kind`` is ``"ce"`` (cross-entropy over the non-ignored pixels, as ``F.cross_entropy``) or ``"ohem"``
    (the same over the hard pixels of :func:`hard_pixel_mask`). ``class_weights`` (``C`` values) weight each
    pixel by its true class and normalise by the summed weights, as ``F.cross_entropy(weight=...)`` does.
    """
    logits = logits.float()
    if kind == "ce":
        return F.cross_entropy(logits, targets, weight=class_weights, ignore_index=ignore_index)
    if kind != "ohem":
        raise ValueError(f"unknown pixel loss {kind!r}, expected 'ce' or 'ohem'")
    keep = hard_pixel_mask(logits, targets, ignore_index, ohem_thresh, ohem_min_kept)
    masked = torch.where(keep, targets, torch.full_like(targets, ignore_index))
    per_pixel = F.cross_entropy(logits, masked, weight=class_weights, ignore_index=ignore_index, reduction="none")
    if class_weights is None:
        weights = keep.to(per_pixel.dtype)
    else:
        weights = class_weights[torch.where(keep, targets, torch.zeros_like(targets))] * keep
    # No pixel kept (none valid): 0 / eps = 0, still a function of the logits, so backward works.
    return per_pixel.sum() / weights.sum().clamp_min(1e-12)
