"""Image and video files through a :class:`~seg.inference.Predictor`: trainId masks, colour masks, overlays.

Inputs are expanded from files, folders and glob patterns; videos are recognised by extension and read
and written with OpenCV (same frame rate and size as the input).
"""

from __future__ import annotations

import glob
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from seg.inference import Predictor
from seg.visualize import colorize, overlay, side_by_side

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
SAVE_KINDS = ("mask", "color", "overlay")


class MediaError(RuntimeError):
    """An input cannot be read or an output cannot be written; the message names the file."""


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


def expand_inputs(inputs: Iterable[str]) -> tuple[list[tuple[Path, str]], list[str]]:
    """Files to process as ``(path, output stem)``, and one error message per input that matched nothing.

    A folder contributes its images and videos (recursively; the stem keeps the sub-folder path so names
    cannot collide); a pattern with ``*``, ``?`` or ``[`` is globbed; anything else must be a file.
    """
    found: list[tuple[Path, str]] = []
    errors: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS + VIDEO_EXTS)
            if not files:
                errors.append(f"{item}: folder holds no images ({', '.join(IMAGE_EXTS)}) or videos")
            found += [(p, str(p.relative_to(path).with_suffix(""))) for p in files]
        elif any(c in item for c in "*?["):
            files = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not files:
                errors.append(f"{item}: pattern matches no file")
            found += [(p, p.stem) for p in files]
        elif path.is_file():
            found.append((path, path.stem))
        else:
            errors.append(f"{item}: no such file or folder")
    # The same stem from two inputs (e.g. a/x.png and b/x.png) would overwrite; keep the parent name too.
    stems = [s for _, s in found]
    found = [(p, f"{p.parent.name}_{s}" if stems.count(s) > 1 else s) for p, s in found]
    return found, errors


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise MediaError(f"cannot read image {path}: missing, truncated or not an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    if not cv2.imwrite(str(path), data):
        raise MediaError(f"cannot write {path}")


def save_outputs(
    image: np.ndarray, trainids: np.ndarray, out_dir: Path, stem: str, save: Iterable[str], opacity: float
) -> list[Path]:
    """Write ``<stem>_mask.png`` (raw trainIds), ``<stem>_color.png`` and ``<stem>_overlay.png`` as asked."""
    written = []
    color = colorize(trainids)
    for kind in save:
        path = out_dir / f"{stem}_{kind}.png"
        if kind == "mask":
            _write(path, trainids.astype(np.uint8))
        elif kind == "color":
            _write(path, color)
        elif kind == "overlay":
            _write(path, overlay(image, color, opacity))
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
            image = read_rgb(path)
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
    cap = cv2.VideoCapture(str(src))
    if not cap.isOpened():
        raise MediaError(f"cannot open video {src}: missing, unsupported or not a video")
    fps = cap.get(cv2.CAP_PROP_FPS)
    width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    if not fps or fps <= 0 or width <= 0 or height <= 0:
        cap.release()
        raise MediaError(f"cannot read video {src}: frame rate {fps}, size {width}x{height}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    out_size = (2 * width, height) if layout == "side" else (width, height)
    writer = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"mp4v"), fps, out_size)
    if not writer.isOpened():
        cap.release()
        raise MediaError(f"cannot write video {dst} (OpenCV mp4v writer)")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=src.name, unit="frame", dynamic_ncols=True)
    frames, model_seconds = 0, 0.0
    try:
        while True:
            batch = []
            while len(batch) < predictor.batch_size:
                ok, frame = cap.read()
                if not ok:
                    break
                batch.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            if not batch:
                break
            t0 = time.perf_counter()
            maps = predictor(batch)
            if predictor.device.type == "cuda":
                torch.cuda.synchronize(predictor.device)
            model_seconds += time.perf_counter() - t0
            for rgb, m in zip(batch, maps, strict=True):
                color = colorize(m)
                view = overlay(rgb, color, opacity)
                if layout == "side":
                    view = side_by_side(view, color)
                writer.write(cv2.cvtColor(view, cv2.COLOR_RGB2BGR))
            frames += len(batch)
            if bar is not None:
                bar.update(len(batch))
    finally:
        cap.release()
        writer.release()
        if bar is not None:
            bar.close()
    if frames == 0:
        raise MediaError(f"cannot read video {src}: no frame could be decoded")
    return VideoStats(frames, fps, (width, height), model_seconds, time.perf_counter() - start, dst)
