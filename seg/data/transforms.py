"""albumentations 2.x pipelines for training and validation, built from a :class:`DataConfig`.

``Compose(strict=True)`` makes a misspelt or 1.x-style argument an error instead of a silent no-op.
Images are RGB uint8 HxWx3, masks uint8 HxW (trainIds or the paper's ids, 255 = ignore); outputs are a
normalised float tensor 3xHxW and a mask tensor (the dataset casts it to int64).
"""

from __future__ import annotations

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from seg.config import DataConfig
from seg.data.labels import IGNORE_INDEX
from seg.data.seeding import seed_transform


def build_transforms(cfg: DataConfig, train: bool, seed: int | None = None) -> A.Compose:
    """Train: random scale -> pad -> random crop -> flip -> jitter -> normalise; val: normalise only, after
    a resize to ``val_short_side`` when set.

    With ``short_side_range`` the scale is the paper's code's (the short side a random integer in the range)
    and with ``pad_position: top_left`` the flip comes before the pad, as there (resize, flip, pad, crop).
    ``seed`` fixes the pipeline's own stream (None: fresh entropy); DataLoader workers are reseeded by
    :func:`seg.data.seeding.worker_init_fn` regardless.
    """
    steps: list[A.BasicTransform] = []
    if train:
        steps += _train_geometry(cfg)
        if max(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) > 0:
            steps.append(
                A.ColorJitter(
                    brightness=(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness),
                    contrast=(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast),
                    saturation=(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation),
                    hue=(-cfg.hue, cfg.hue),
                    p=1.0,
                )
            )
    elif cfg.val_short_side is not None:
        steps.append(short_side_resize(cfg.val_short_side))
    steps += [
        A.Normalize(mean=tuple(cfg.mean), std=tuple(cfg.std), max_pixel_value=255.0),
        ToTensorV2(),
    ]
    pipeline = A.Compose(steps, strict=True)
    if seed is not None:
        seed_transform(pipeline, seed)
    return pipeline


def short_side_resize(size: int | list[int]) -> A.SmallestMaxSize:
    """The short side resized to ``size`` (a list: one of its values at random), the aspect ratio kept.

    As the paper's code's ``F.resize(image, size)`` (PIL bilinear, which smooths when it shrinks) with the
    label nearest (``Image.NEAREST``): OpenCV's area filter where the image shrinks, bilinear where it grows,
    and the label by ``INTER_NEAREST_EXACT``, the nearest pixel as PIL picks it.
    """
    return A.SmallestMaxSize(
        max_size=size,
        interpolation=cv2.INTER_LINEAR,
        mask_interpolation=cv2.INTER_NEAREST_EXACT,
        area_for_downscale="image",
        p=1.0,
    )


def _train_geometry(cfg: DataConfig) -> list[A.BasicTransform]:
    crop_h, crop_w = cfg.crop_size
    steps: list[A.BasicTransform] = []
    if cfg.short_side_range is not None:
        lo, hi = cfg.short_side_range
        steps.append(short_side_resize(list(range(lo, hi + 1))))  # random.randint(lo, hi), both ends included
    elif tuple(cfg.scale_range) != (1.0, 1.0):
        lo, hi = cfg.scale_range
        # RandomScale draws a factor 1 + U(limit), relative to the input image; mask resized nearest.
        steps.append(
            A.RandomScale(
                scale_limit=(lo - 1.0, hi - 1.0),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=1.0,
            )
        )
    flip = [A.HorizontalFlip(p=cfg.hflip_prob)] if cfg.hflip_prob > 0 else []
    crop = [
        A.PadIfNeeded(
            min_height=crop_h,
            min_width=crop_w,
            position=cfg.pad_position,
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=IGNORE_INDEX,
        ),
        A.RandomCrop(height=crop_h, width=crop_w),
    ]
    # The paper's code flips before it pads, so its padding is always at the bottom and right.
    return steps + (flip + crop if cfg.pad_position == "top_left" else crop + flip)
