"""A generated stand-in for CIFAR-10, written in the exact official python-version archive layout.

``generate_cifar10_standin(root, ...)`` writes ``root/cifar-10-batches-py/`` with ``data_batch_1`` ..
``data_batch_5``, ``test_batch`` and ``batches.meta``: protocol-2 pickles of dicts with the official bytes
keys and types (``b'data'`` uint8 N x 3072 channel-major RGB, ``b'labels'`` list of int, ``b'filenames'``
list of bytes, ``b'batch_label'`` bytes; meta ``b'label_names'``, ``b'num_cases_per_batch'``,
``b'num_vis'``). Tests and CPU smoke runs therefore go through the same reader as the real data
(:class:`seg.data.cifar.CifarDataset`).

The ten classes are drawn procedurally at 32x32 (rendered at 4x and area-downsampled): five shapes (disc,
square, triangle, ring, cross), four textures (horizontal, vertical, diagonal stripes, checkerboard) and
scattered dots. Position, size, rotation, stripe period and phase vary per image; foreground and background
colours are random (never tied to a class) over a background gradient, plus Gaussian noise, so a model has to
learn shape and texture rather than colour. Everything is a deterministic function of the seed; each image
depends only on (seed, split, index), not on the other counts.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from seg.errors import UserError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
PICKLE_PROTOCOL = 2  # as the official (Python 2 cPickle) files
CLASS_NAMES = (
    "disc",
    "square",
    "triangle",
    "ring",
    "cross",
    "hstripes",
    "vstripes",
    "diagonal",
    "checker",
    "dots",
)
SIZE = 32
SCALE = 4  # render at 128x128, then INTER_AREA down to 32x32 (anti-aliasing)
MAX_TRAIN_PER_CLASS = 5000  # the official split: 5000 train, 1000 test images per class
MAX_TEST_PER_CLASS = 1000

_SPLIT_KEY = {"train": 0, "test": 1}


class StandinError(UserError, ValueError):
    """A stand-in parameter is out of range or the output cannot be written; the message names it."""


# --------------------------------------------------------------------------------------------
# drawing: every function returns a float mask in [0, 1] of the foreground at the render size


def _canvas() -> np.ndarray:
    return np.zeros((SIZE * SCALE, SIZE * SCALE), np.uint8)


def _center_and_radius(rng: np.random.Generator, lo: float = 0.2, hi: float = 0.36) -> tuple[float, float, float]:
    n = SIZE * SCALE
    r = rng.uniform(lo, hi) * n
    cx, cy = rng.uniform(r, n - r, size=2)
    return float(cx), float(cy), float(r)


def _regular_polygon(cx: float, cy: float, r: float, sides: int, angle: float) -> np.ndarray:
    t = angle + np.arange(sides) * 2 * np.pi / sides
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], -1)


def _fill(points: np.ndarray) -> np.ndarray:
    m = _canvas()
    cv2.fillPoly(m, [np.round(points).astype(np.int32)], 255, cv2.LINE_AA)
    return m / 255.0


def _disc(rng: np.random.Generator) -> np.ndarray:
    cx, cy, r = _center_and_radius(rng)
    m = _canvas()
    cv2.circle(m, (round(cx), round(cy)), round(r), 255, -1, cv2.LINE_AA)
    return m / 255.0


def _square(rng: np.random.Generator) -> np.ndarray:
    cx, cy, r = _center_and_radius(rng)
    return _fill(_regular_polygon(cx, cy, r, 4, rng.uniform(0, np.pi / 2)))


def _triangle(rng: np.random.Generator) -> np.ndarray:
    cx, cy, r = _center_and_radius(rng, 0.24, 0.4)
    return _fill(_regular_polygon(cx, cy, r, 3, rng.uniform(0, 2 * np.pi)))


def _ring(rng: np.random.Generator) -> np.ndarray:
    cx, cy, r = _center_and_radius(rng, 0.22, 0.38)
    m = _canvas()
    thickness = max(2, round(r * rng.uniform(0.25, 0.4)))
    cv2.circle(m, (round(cx), round(cy)), round(r - thickness / 2), 255, thickness, cv2.LINE_AA)
    return m / 255.0


def _cross(rng: np.random.Generator) -> np.ndarray:
    cx, cy, r = _center_and_radius(rng, 0.24, 0.4)
    half = r * rng.uniform(0.14, 0.22)
    angle = rng.uniform(-0.3, 0.3)
    arm = np.array([[-r, -half], [r, -half], [r, half], [-r, half]])
    m = np.zeros_like(_canvas(), dtype=np.float64)
    for a in (angle, angle + np.pi / 2):
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        m = np.maximum(m, _fill(arm @ rot.T + (cx, cy)))
    return m


def _region(rng: np.random.Generator) -> np.ndarray:
    """A random axis-aligned rectangle covering 55-100% of each side (textures fill it)."""
    n = SIZE * SCALE
    h, w = (rng.uniform(0.55, 1.0, size=2) * n).astype(int)
    y0, x0 = rng.integers(0, n - h + 1), rng.integers(0, n - w + 1)
    m = np.zeros((n, n))
    m[y0 : y0 + h, x0 : x0 + w] = 1.0
    return m


def _stripes(rng: np.random.Generator, angle: float) -> np.ndarray:
    n = SIZE * SCALE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    period = rng.uniform(3.0, 6.0) * SCALE
    u = xx * math.cos(angle) + yy * math.sin(angle) + rng.uniform(0, period)
    on = (np.mod(u, period) < period * rng.uniform(0.4, 0.6)).astype(np.float64)
    return on * _region(rng)


def _hstripes(rng: np.random.Generator) -> np.ndarray:
    return _stripes(rng, np.pi / 2 + rng.uniform(-0.15, 0.15))  # bands vary along y


def _vstripes(rng: np.random.Generator) -> np.ndarray:
    return _stripes(rng, rng.uniform(-0.15, 0.15))


def _diagonal(rng: np.random.Generator) -> np.ndarray:
    return _stripes(rng, rng.choice([np.pi / 4, 3 * np.pi / 4]) + rng.uniform(-0.15, 0.15))


def _checker(rng: np.random.Generator) -> np.ndarray:
    n = SIZE * SCALE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    cell = rng.uniform(3.0, 6.0) * SCALE
    a = rng.uniform(-0.2, 0.2)
    u = (xx * math.cos(a) + yy * math.sin(a)) / cell + rng.uniform(0, 1)
    v = (-xx * math.sin(a) + yy * math.cos(a)) / cell + rng.uniform(0, 1)
    on = ((np.floor(u) + np.floor(v)) % 2).astype(np.float64)
    return on * _region(rng)


def _dots(rng: np.random.Generator) -> np.ndarray:
    n = SIZE * SCALE
    m = _canvas()
    for _ in range(int(rng.integers(5, 10))):
        r = rng.uniform(1.3, 2.6) * SCALE
        cx, cy = rng.uniform(r, n - r, size=2)
        cv2.circle(m, (round(cx), round(cy)), round(r), 255, -1, cv2.LINE_AA)
    return m / 255.0


DRAWERS: tuple[Callable[[np.random.Generator], np.ndarray], ...] = (
    _disc,
    _square,
    _triangle,
    _ring,
    _cross,
    _hstripes,
    _vstripes,
    _diagonal,
    _checker,
    _dots,
)


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random background and foreground RGB colours at least 90 apart (Euclidean, 0..255)."""
    bg = rng.uniform(0, 255, size=3)
    for _ in range(100):
        fg = rng.uniform(0, 255, size=3)
        if np.linalg.norm(fg - bg) >= 90:
            break
    else:  # practically unreachable; keep it deterministic anyway
        fg = 255.0 - bg
    return bg, fg


def draw_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 32x32x3 image of class ``label`` (0..9), drawn with ``rng``."""
    n = SIZE * SCALE
    bg, fg = _colours(rng)
    # background: base colour plus a linear gradient in a random direction
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1) - 0.5
    a = rng.uniform(0, 2 * np.pi)
    ramp = (xx * math.cos(a) + yy * math.sin(a))[..., None] * rng.uniform(-70, 70, size=3)
    background = bg + ramp
    mask = DRAWERS[label](rng)[..., None]
    canvas = background * (1.0 - mask) + (fg + 0.5 * ramp) * mask
    small = cv2.resize(canvas.astype(np.float32), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    small += rng.normal(0.0, rng.uniform(3.0, 12.0), size=small.shape)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def draw_split(split: str, per_class: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """(images uint8 N x 32 x 32 x 3, labels) of a split, classes interleaved then shuffled by ``seed``."""
    labels = np.tile(np.arange(len(CLASS_NAMES)), per_class)
    images = np.stack(
        [
            draw_image(int(lab), np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_KEY[split], i])))
            for i, lab in enumerate(labels)
        ]
    )
    order = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_KEY[split], 2**31])).permutation(len(labels))
    return images[order], [int(x) for x in labels[order]]


# --------------------------------------------------------------------------------------------
# writing the official layout


def _batch_dict(images: np.ndarray, labels: list[int], batch_label: str, first_index: int) -> dict:
    data = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1), dtype=np.uint8)
    filenames = [f"{CLASS_NAMES[lab]}_s_{first_index + i:06d}.png".encode("ascii") for i, lab in enumerate(labels)]
    return {
        b"batch_label": batch_label.encode("ascii"),
        b"labels": list(labels),
        b"data": data,
        b"filenames": filenames,
    }


def _write_pickle(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            pickle.dump(obj, f, protocol=PICKLE_PROTOCOL)
        tmp.replace(path)
    except OSError as e:
        raise StandinError(f"cannot write {path}: {e.strerror or e}") from e


def _check_count(name: str, value: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= maximum:
        raise StandinError(f"{name} must be an integer in 1..{maximum}, got {value!r}")


def generate_cifar10_standin(
    root: str | Path, train_per_class: int = 50, test_per_class: int = 20, seed: int = 0
) -> Path:
    """Write ``root/cifar-10-batches-py/`` (official CIFAR-10 python layout) and return ``root``.

    ``train_per_class`` images of each of the 10 classes are spread over ``data_batch_1`` .. ``_5`` (in
    shuffled order, as the official batches are), ``test_per_class`` per class go to ``test_batch``.
    Existing files of the same names are replaced.
    """
    _check_count("train_per_class", train_per_class, MAX_TRAIN_PER_CLASS)
    _check_count("test_per_class", test_per_class, MAX_TEST_PER_CLASS)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise StandinError(f"seed must be an integer >= 0, got {seed!r}")
    root = Path(root)
    folder = root / FOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StandinError(f"cannot create {folder}: {e.strerror or e}") from e

    images, labels = draw_split("train", int(train_per_class), int(seed))
    bounds = np.linspace(0, len(labels), len(TRAIN_FILES) + 1).round().astype(int)
    for k, name in enumerate(TRAIN_FILES):
        lo, hi = bounds[k], bounds[k + 1]
        batch = _batch_dict(images[lo:hi], labels[lo:hi], f"training batch {k + 1} of {len(TRAIN_FILES)}", lo)
        _write_pickle(folder / name, batch)

    images, labels = draw_split("test", int(test_per_class), int(seed))
    _write_pickle(folder / TEST_FILE, _batch_dict(images, labels, "testing batch 1 of 1", 0))

    meta = {
        b"num_cases_per_batch": int(bounds[1] - bounds[0]),
        b"label_names": [n.encode("ascii") for n in CLASS_NAMES],
        b"num_vis": SIZE * SIZE * 3,
    }
    _write_pickle(folder / META_FILE, meta)
    return root
