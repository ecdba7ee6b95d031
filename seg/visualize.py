"""Colour masks in the Cityscapes palette and overlays on the input image; segmenting image and video files
with a :class:`~seg.inference.Predictor` into them (``<stem>_mask.png`` (raw trainIds), ``<stem>_color.png`` and
``<stem>_overlay.png`` per image; ``<stem>_seg.mp4`` per video, at the input's frame rate and size)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from seg.data.labels import IGNORE_INDEX, NUM_CLASSES, PALETTE
from seg.media import MediaError, VideoReader, VideoWriter, read_image_rgb, write_image

if TYPE_CHECKING:
    from seg.inference import Predictor

SAVE_KINDS = ("mask", "color", "overlay")

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


# --------------------------------------------------------------------------------------------
# segmenting files


def save_outputs(
    image: np.ndarray, trainids: np.ndarray, out_dir: Path, stem: str, save: Iterable[str], opacity: float
) -> list[Path]:
    """Write ``<stem>_mask.png`` (raw trainIds), ``<stem>_color.png`` and ``<stem>_overlay.png`` as asked."""
    written = []
    color = colorize(trainids)
    for kind in save:
        path = out_dir / f"{stem}_{kind}.png"
        if kind == "mask":
            write_image(path, trainids.astype(np.uint8))
        elif kind == "color":
            write_image(path, color)
        elif kind == "overlay":
            write_image(path, overlay(image, color, opacity))
        else:
            raise ValueError(f"unknown output kind {kind!r}; expected some of {', '.join(SAVE_KINDS)}")
        written.append(path)
    return written


def segment_images(
    predictor: Predictor,
    files: list[tuple[Path, str]],
    out_dir: Path,
    save: Iterable[str] = SAVE_KINDS,
    opacity: float = 0.5,
    on_error: Callable[[str], None] | None = None,
) -> int:
    """Segment image files in batches of ``predictor.batch_size``; returns how many succeeded.

    An unreadable image is reported through ``on_error`` (raised when ``None``); the others go on.
    """
    save = list(save)
    done = 0
    batch: list[tuple[np.ndarray, str]] = []

    def flush() -> None:
        nonlocal done
        if not batch:
            return
        maps = predictor([im for im, _ in batch])
        for (im, stem), m in zip(batch, maps, strict=True):
            save_outputs(im, m, out_dir, stem, save, opacity)
            done += 1
        batch.clear()

    for path, stem in files:
        try:
            image = read_image_rgb(path)
        except MediaError as e:
            if on_error is None:
                raise
            on_error(str(e))
            continue
        if batch and (len(batch) >= predictor.batch_size or batch[0][0].shape != image.shape):
            flush()
        batch.append((image, stem))
    flush()
    return done


@dataclass
class VideoStats:
    frames: int
    fps: float
    size: tuple[int, int]  # W, H of the input
    model_seconds: float
    total_seconds: float
    output: Path

    @property
    def model_fps(self) -> float:
        return self.frames / self.model_seconds if self.model_seconds > 0 else float("nan")

    @property
    def end_to_end_fps(self) -> float:
        return self.frames / self.total_seconds if self.total_seconds > 0 else float("nan")


def segment_video(
    predictor: Predictor,
    src: Path,
    dst: Path,
    layout: str = "overlay",
    opacity: float = 0.5,
    progress: bool = True,
) -> VideoStats:
    """Write ``dst``: every frame of ``src`` as an overlay (``layout='overlay'``) or next to its colour
    mask (``'side'``, twice as wide), at the input's frame rate. Returns timing statistics."""
    if layout not in ("overlay", "side"):
        raise ValueError(f"layout must be 'overlay' or 'side', got {layout!r}")
    start = time.perf_counter()
    frames, model_seconds = 0, 0.0
    with VideoReader(src) as reader:
        width, height = reader.size
        out_size = (2 * width, height) if layout == "side" else (width, height)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=reader.frame_count or None, desc=src.name, unit="frame", dynamic_ncols=True)
        try:
            with VideoWriter(dst, reader.fps, out_size) as writer:
                for batch in reader.batches(predictor.batch_size):
                    t0 = time.perf_counter()
                    maps = predictor(batch)
                    if predictor.device.type == "cuda":
                        torch.cuda.synchronize(predictor.device)
                    model_seconds += time.perf_counter() - t0
                    for rgb, m in zip(batch, maps, strict=True):
                        color = colorize(m)
                        view = overlay(rgb, color, opacity)
                        writer.write(side_by_side(view, color) if layout == "side" else view)
                    frames += len(batch)
                    if bar is not None:
                        bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
    if frames == 0:
        raise MediaError(f"cannot read video {src}: no frame could be decoded")
    return VideoStats(frames, reader.fps, reader.size, model_seconds, time.perf_counter() - start, dst)
