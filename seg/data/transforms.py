"""albumentations 2.x pipelines for training and validation, built from a :class:`DataConfig`.

``Compose(strict=True)`` makes a misspelt or 1.x-style argument an error instead of a silent no-op.
Images are RGB uint8 HxWx3, masks trainIds uint8 HxW (255 = ignore); outputs are a normalised float tensor
3xHxW and a mask tensor (the dataset casts it to int64).
"""

from __future__ import annotations

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from seg.config import DataConfig
from seg.data.labels import IGNORE_INDEX
from seg.data.seeding import seed_transform


def build_transforms(cfg: DataConfig, train: bool, seed: int | None = None) -> A.Compose:
    """Train: random scale -> pad -> random crop -> flip -> jitter -> normalise; val: normalise only.

    ``seed`` fixes the pipeline's own stream (None: fresh entropy); DataLoader workers are reseeded by
    :func:`seg.data.seeding.worker_init_fn` regardless.
    """
    steps: list[A.BasicTransform] = []
    if train:
        lo, hi = cfg.scale_range
        crop_h, crop_w = cfg.crop_size
        if (lo, hi) != (1.0, 1.0):
            # RandomScale draws a factor 1 + U(limit), relative to the input image; mask resized nearest.
            steps.append(
                A.RandomScale(
                    scale_limit=(lo - 1.0, hi - 1.0),
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    p=1.0,
                )
            )
        steps += [
            A.PadIfNeeded(
                min_height=crop_h,
                min_width=crop_w,
                position="center",
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=IGNORE_INDEX,
            ),
            A.RandomCrop(height=crop_h, width=crop_w),
        ]
        if cfg.hflip_prob > 0:
            steps.append(A.HorizontalFlip(p=cfg.hflip_prob))
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
    steps += [
        A.Normalize(mean=tuple(cfg.mean), std=tuple(cfg.std), max_pixel_value=255.0),
        ToTensorV2(),
    ]
    pipeline = A.Compose(steps, strict=True)
    if seed is not None:
        seed_transform(pipeline, seed)
    return pipeline
