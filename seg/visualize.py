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


TITLE_HEIGHT = 22  # pixels of the caption strip above each panel
GAP = 4  # pixels of white between panels


def titled_row(images: list[np.ndarray], titles: list[str]) -> np.ndarray:
    """H,W,3 images of one size in a row, each under its caption (white strip, black text), white gaps between:
    e.g. input | ground truth | prediction for a person to compare at a glance."""
    import cv2  # on use: the drawing needs OpenCV, colorize/overlay do not

    if not images or len(images) != len(titles):
        raise ValueError(f"titled_row needs one title per image, got {len(images)} images and {len(titles)} titles")
    shape = images[0].shape
    if any(im.shape != shape for im in images) or len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"titled_row needs H,W,3 images of one shape, got {[im.shape for im in images]}")
    height, width = shape[:2]
    row = np.full((height + TITLE_HEIGHT, len(images) * (width + GAP) - GAP, 3), 255, dtype=np.uint8)
    for k, (image, title) in enumerate(zip(images, titles, strict=True)):
        x = k * (width + GAP)
        row[TITLE_HEIGHT:, x:x + width] = image
        cv2.putText(row, title, (x + 4, TITLE_HEIGHT - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return row
