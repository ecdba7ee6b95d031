"""The segmentation pixel losses: cross-entropy, class weights, online hard example mining."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from seg.tasks.pixel_loss import hard_pixel_mask, pixel_loss

IGNORE = 255


def _batch(seed: int = 0, n: int = 2, c: int = 5, h: int = 6, w: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g) * 3
    targets = torch.randint(0, c, (n, h, w), generator=g)
    targets[0, :2] = IGNORE
    return logits, targets


def test_ce_is_cross_entropy_over_valid_pixels():
    logits, targets = _batch()
    expected = F.cross_entropy(logits, targets, ignore_index=IGNORE)
    torch.testing.assert_close(pixel_loss(logits, targets, ignore_index=IGNORE), expected)


def test_ohem_keeps_every_pixel_when_the_threshold_is_one():
    logits, targets = _batch(1)
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])
    for w in (None, weights):
        expected = F.cross_entropy(logits, targets, weight=w, ignore_index=IGNORE)
        got = pixel_loss(logits, targets, ignore_index=IGNORE, kind="ohem", class_weights=w, ohem_thresh=1.0)
        torch.testing.assert_close(got, expected)


def test_ohem_min_kept_trains_on_the_k_hardest_pixels():
    logits, targets = _batch(2)
    k = 17
    per_pixel = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")
    valid = targets != IGNORE
    hardest = per_pixel[valid].sort(descending=True).values[:k]  # lowest true-class probability = highest loss
    got = pixel_loss(logits, targets, ignore_index=IGNORE, kind="ohem", ohem_thresh=0.0, ohem_min_kept=k)
    torch.testing.assert_close(got, hardest.mean())
    mask = hard_pixel_mask(logits, targets, IGNORE, 0.0, k)
    assert int(mask.sum()) == k and not bool((mask & ~valid).any())


def test_ohem_threshold_keeps_pixels_below_it_and_never_ignored_ones():
    logits, targets = _batch(3)
    prob = logits.softmax(1).gather(1, targets.clamp(max=4).unsqueeze(1)).squeeze(1)
    mask = hard_pixel_mask(logits, targets, IGNORE, 0.5, 0)
    expected = (prob <= 0.5) & (targets != IGNORE)
    assert torch.equal(mask, expected) and 0 < int(mask.sum()) < int((targets != IGNORE).sum())


def test_ohem_with_nothing_valid_is_zero_and_differentiable():
    logits, targets = _batch(4)
    logits.requires_grad_(True)
    targets.fill_(IGNORE)
    loss = pixel_loss(logits, targets, ignore_index=IGNORE, kind="ohem", ohem_min_kept=10)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_unknown_kind_is_refused():
    logits, targets = _batch()
    with pytest.raises(ValueError, match="'focal'"):
        pixel_loss(logits, targets, ignore_index=IGNORE, kind="focal")


def test_segmentation_task_trains_with_the_configured_loss():
    from seg.config import load_config
    from seg.tasks import build_task

    logits, targets = _batch(5, c=19)
    outputs = {"out": logits, "aux": logits * 0.5}
    weights = [1.0 + i / 10 for i in range(19)]
    base = ["train.aux_weight=0.4", "train.loss=ce"]
    configs = Path(__file__).resolve().parents[1] / "configs"
    plain = build_task(load_config(configs / "demo.yaml", base)).loss(outputs, targets)
    expected = F.cross_entropy(logits, targets, ignore_index=IGNORE)
    torch.testing.assert_close(plain, expected + 0.4 * F.cross_entropy(logits * 0.5, targets, ignore_index=IGNORE))

    over = [*base, "train.loss=ohem", "train.ohem_thresh=0.3", "train.ohem_min_kept=5",
            f"train.class_weights={weights}"]
    task = build_task(load_config(configs / "demo.yaml", over))
    w = torch.tensor(weights)
    expected = sum(f * pixel_loss(x, targets, ignore_index=IGNORE, kind="ohem", class_weights=w, ohem_thresh=0.3,
                                  ohem_min_kept=5) for f, x in ((1.0, logits), (0.4, logits * 0.5)))
    torch.testing.assert_close(task.loss(outputs, targets), expected)
    assert not torch.allclose(task.loss(outputs, targets), plain)


def test_classification_refuses_segmentation_losses():
    from seg.config import ConfigError, load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    with pytest.raises(ConfigError, match="train.loss"):
        load_config(configs / "cifar10" / "vgg16_bn.yaml", ["train.loss=ohem"])
