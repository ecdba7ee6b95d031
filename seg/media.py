"""Image and video files: reading and writing them, and finding them from command-line inputs.

The dataset, evaluation, inference and the demo read and write images and videos through here (OpenCV
underneath, RGB order everywhere above it); a failure is a :class:`MediaError` naming the file. Segmenting
files with a :class:`~seg.inference.Predictor` and the pictures that gives are in :mod:`seg.visualize`.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np

from seg.errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


class MediaError(UserError, RuntimeError):
    """An input cannot be read or an output cannot be written; the message names the file."""


# --------------------------------------------------------------------------------------------
# images


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Read an 8-bit colour image as RGB uint8 H,W,3; a missing, truncated or non-image file raises."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise MediaError(f"cannot read image {path}: file is missing, truncated or not an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path, what: str = "mask") -> np.ndarray:
    """Read a single-channel 8-bit PNG (labels, masks) as uint8 H,W; ``what`` names it in errors."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise MediaError(f"cannot read {what} {path}: file is missing, truncated or not an image")
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise MediaError(f"{what} {path} must be a single-channel 8-bit PNG, got shape {mask.shape} {mask.dtype}")
    return mask


def write_image(path: str | Path, array: np.ndarray) -> Path:
    """Write an RGB H,W,3 or single-channel H,W (uint8 or uint16) image; the format follows the suffix.

    Parent folders are created. Single-channel values are stored as they are (e.g. trainIds, labelIds).
    """
    path = Path(path)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"write_image {path}: expected H,W or H,W,3, got shape {array.shape}")
    if array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"write_image {path}: expected uint8 or uint16 values, got {array.dtype}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MediaError(f"cannot write {path}: {e.strerror or e}") from e
    data = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    if not cv2.imwrite(str(path), np.ascontiguousarray(data)):
        raise MediaError(f"cannot write {path} (unwritable folder or unknown image suffix)")
    return path


# --------------------------------------------------------------------------------------------
# videos


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


class VideoReader:
    """RGB frames of a video file in batches; ``fps``, ``size`` (W, H) and ``frame_count`` (0: unknown)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._cap = cv2.VideoCapture(str(self.path))
        if not self._cap.isOpened():
            raise MediaError(f"cannot open video {self.path}: missing, unsupported or not a video")
        self.fps = float(self._cap.get(cv2.CAP_PROP_FPS))
        self.size = (int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        self.frame_count = max(0, int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT)))
        if not self.fps > 0 or min(self.size) <= 0:
            self.close()
            w, h = self.size
            raise MediaError(f"cannot read video {self.path}: frame rate {self.fps}, size {w}x{h}")

    def batches(self, batch_size: int) -> Iterator[list[np.ndarray]]:
        """Consecutive frames, ``batch_size`` at a time (the last batch may be shorter)."""
        while True:
            batch = []
            while len(batch) < batch_size:
                ok, frame = self._cap.read()
                if not ok:
                    break
                batch.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            if not batch:
                return
            yield batch

    def close(self) -> None:
        self._cap.release()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VideoWriter:
    """Writes RGB frames of one size to an mp4 file (OpenCV's ``mp4v`` codec)."""

    def __init__(self, path: str | Path, fps: float, size: tuple[int, int]):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MediaError(f"cannot write video {self.path}: {e.strerror or e}") from e
        self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        if not self._writer.isOpened():
            raise MediaError(f"cannot write video {self.path} (OpenCV mp4v writer)")

    def write(self, frame_rgb: np.ndarray) -> None:
        self._writer.write(cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        self._writer.release()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# inputs


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
