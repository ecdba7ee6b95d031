"""Colour masks in the Cityscapes palette and overlays on the input image."""

from __future__ import annotations

import numpy as np

from seg.data.labels import IGNORE_INDEX, NUM_CLASSES, PALETTE

# trainId -> RGB for every uint8 value: the 19 classes get their Cityscapes colour, everything else black.
_LUT = np.zeros((256, 3), dtype=np.uint8)
_LUT[:NUM_CLASSES] = PALETTE


def colorize(trainid_map: np.ndarray) -> np.ndarray:
    """TrainId map H,W (0..18, 255 = ignore) -> H,W,3 uint8 RGB in the Cityscapes palette; ignore is black."""
    ids = np.asarray(trainid_map)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"colorize expects an integer H,W trainId map, got {ids.dtype} {ids.shape}")
    bad = ((ids < 0) | (ids >= NUM_CLASSES)) & (ids != IGNORE_INDEX)
    if bad.any():
        raise ValueError(
            f"colorize: value {int(ids[bad].flat[0])} is not a trainId "
            f"(expected 0..{NUM_CLASSES - 1} or {IGNORE_INDEX})"
        )
    return _LUT[ids.astype(np.uint8)]


def overlay(image_rgb: np.ndarray, color: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """Blend a colour mask over an RGB image: ``(1 - opacity) * image + opacity * color`` (uint8)."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    if image_rgb.shape != color.shape or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"image {image_rgb.shape} and colour mask {color.shape} must both be H,W,3")
    out = image_rgb.astype(np.float32) * (1.0 - opacity) + color.astype(np.float32) * opacity
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two H,W,3 images next to each other (H, 2W, 3)."""
    if left.shape != right.shape:
        raise ValueError(f"side_by_side needs equal shapes, got {left.shape} and {right.shape}")
    return np.concatenate([left, right], axis=1)
