"""A generated stand-in for MNIST or Fashion-MNIST, written as the four official idx files.

``generate_mnist_standin(root, ...)`` writes ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (``.gz`` with ``gzip=True``) into ``root``: uint8
N x 28 x 28 images, light strokes on a black background as in the official sets, and uint8 labels 0..9. Tests
and CPU smoke runs therefore go through the same reader as the real data
(:class:`seg.data.mnist.MnistDataset`).

``kind="mnist"``: the ten digits typeset in one of OpenCV's Hershey fonts; ``kind="fashion_mnist"``: crude
silhouettes of the ten Fashion-MNIST classes (T-shirt, trouser, pullover, dress, coat, sandal, shirt,
sneaker, bag, ankle boot). Each image is drawn at 4x, moved by a random affine map (scale, rotation, shear,
shift), area-downsampled, its brightness and stroke width varied, plus noise. Everything is a deterministic
function of the seed; each image depends only on (seed, kind, split, index), not on the counts.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from seg.data.cifar_standin import StandinError
from seg.data.idx import write_idx
from seg.data.mnist import FILES, IMAGE_SIZE

KINDS = ("mnist", "fashion_mnist")
SCALE = 4  # render at 112x112, then INTER_AREA down to 28x28
MAX_TRAIN_PER_CLASS = 6000  # Fashion-MNIST's split: 6000 train, 1000 test images per class
MAX_TEST_PER_CLASS = 1000
_SPLIT_KEY = {"train": 0, "test": 1}
_KIND_KEY = {"mnist": 0, "fashion_mnist": 1}
_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX,
          cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_SCRIPT_SIMPLEX)

# Fashion-MNIST silhouettes: polygons in a unit square (x right, y down), in class order.
_GARMENTS: tuple[tuple[tuple[tuple[float, float], ...], ...], ...] = (
    # T-shirt/top: short sleeves
    (((0.3, 0.15), (0.7, 0.15), (0.95, 0.35), (0.82, 0.45), (0.72, 0.38), (0.72, 0.9), (0.28, 0.9),
      (0.28, 0.38), (0.18, 0.45), (0.05, 0.35)),),
    # Trouser: two legs
    (((0.3, 0.08), (0.7, 0.08), (0.72, 0.95), (0.55, 0.95), (0.5, 0.35), (0.45, 0.95), (0.28, 0.95)),),
    # Pullover: long sleeves to the hem
    (((0.32, 0.12), (0.68, 0.12), (0.92, 0.3), (0.97, 0.88), (0.84, 0.88), (0.75, 0.42), (0.74, 0.9),
      (0.26, 0.9), (0.25, 0.42), (0.16, 0.88), (0.03, 0.88), (0.08, 0.3)),),
    # Dress: narrow top, wide hem
    (((0.38, 0.05), (0.62, 0.05), (0.64, 0.35), (0.85, 0.95), (0.15, 0.95), (0.36, 0.35)),),
    # Coat: long sleeves, long body, open front
    (((0.3, 0.05), (0.47, 0.05), (0.47, 0.97), (0.2, 0.97), (0.2, 0.4), (0.12, 0.85), (0.02, 0.85),
      (0.1, 0.2)),
     ((0.53, 0.05), (0.7, 0.05), (0.9, 0.2), (0.98, 0.85), (0.88, 0.85), (0.8, 0.4), (0.8, 0.97),
      (0.53, 0.97))),
    # Sandal: a sole and two thin straps
    (((0.05, 0.78), (0.95, 0.72), (0.95, 0.82), (0.05, 0.88)),
     ((0.2, 0.78), (0.3, 0.45), (0.36, 0.47), (0.28, 0.78)),
     ((0.55, 0.75), (0.7, 0.4), (0.76, 0.42), (0.63, 0.75))),
    # Shirt: collar points and a button placket gap
    (((0.3, 0.12), (0.45, 0.2), (0.48, 0.9), (0.25, 0.9), (0.25, 0.42), (0.14, 0.8), (0.04, 0.78),
      (0.1, 0.25)),
     ((0.55, 0.2), (0.7, 0.12), (0.9, 0.25), (0.96, 0.78), (0.86, 0.8), (0.75, 0.42), (0.75, 0.9),
      (0.52, 0.9))),
    # Sneaker: a low shoe
    (((0.05, 0.55), (0.4, 0.5), (0.6, 0.62), (0.95, 0.68), (0.95, 0.82), (0.05, 0.82)),),
    # Bag: a box and a handle
    (((0.1, 0.4), (0.9, 0.4), (0.92, 0.92), (0.08, 0.92)),
     ((0.3, 0.4), (0.35, 0.12), (0.65, 0.12), (0.7, 0.4), (0.62, 0.4), (0.58, 0.2), (0.42, 0.2),
      (0.38, 0.4))),
    # Ankle boot: a shaft and a foot
    (((0.3, 0.08), (0.62, 0.08), (0.64, 0.55), (0.95, 0.7), (0.95, 0.9), (0.1, 0.9), (0.12, 0.55),
      (0.3, 0.45)),),
)


def _affine(rng: np.random.Generator, n: int, spread: float) -> np.ndarray:
    """A random 2x3 map of the n x n canvas about its centre: scale, rotation, shear and shift."""
    s = rng.uniform(0.75, 1.0)
    a = rng.uniform(-spread, spread)
    sh = rng.uniform(-0.2, 0.2)
    lin = s * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) @ np.array([[1.0, sh], [0.0, 1.0]])
    c = np.array([n / 2, n / 2])
    shift = rng.uniform(-0.08, 0.08, size=2) * n
    return np.hstack([lin, (c - lin @ c + shift)[:, None]])


def _digit(label: int, rng: np.random.Generator) -> np.ndarray:
    n = IMAGE_SIZE * SCALE
    canvas = np.zeros((n, n), np.uint8)
    font = _FONTS[int(rng.integers(len(_FONTS)))]
    thickness = int(rng.integers(6, 13))
    text = str(label)
    (w, h), base = cv2.getTextSize(text, font, 1.0, thickness)
    scale = 0.7 * n / max(w, h + base)
    (w, h), base = cv2.getTextSize(text, font, scale, thickness)
    cv2.putText(canvas, text, ((n - w) // 2, (n + h) // 2), font, scale, 255, thickness, cv2.LINE_AA)
    return cv2.warpAffine(canvas, _affine(rng, n, 0.25), (n, n), flags=cv2.INTER_LINEAR)


def _garment(label: int, rng: np.random.Generator) -> np.ndarray:
    n = IMAGE_SIZE * SCALE
    canvas = np.zeros((n, n), np.uint8)
    margin = 0.1 * n
    polygons = [np.round(margin + np.asarray(p) * (n - 2 * margin)).astype(np.int32) for p in _GARMENTS[label]]
    cv2.fillPoly(canvas, polygons, int(rng.integers(120, 256)), cv2.LINE_AA)
    # a faint texture (stripes at a random angle) as clothes photos have
    yy, xx = np.mgrid[0:n, 0:n]
    t = rng.uniform(0, np.pi)
    stripes = 1.0 - rng.uniform(0.0, 0.35) * (np.sin((xx * math.cos(t) + yy * math.sin(t)) / rng.uniform(3, 9)) > 0)
    canvas = (canvas * stripes).astype(np.uint8)
    return cv2.warpAffine(canvas, _affine(rng, n, 0.1), (n, n), flags=cv2.INTER_LINEAR)


def draw_image(kind: str, label: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 28x28 image of class ``label`` (0..9) of ``kind``, drawn with ``rng``."""
    big = (_digit if kind == "mnist" else _garment)(label, rng)
    small = cv2.resize(big.astype(np.float32), (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)
    small = small * rng.uniform(0.8, 1.15) + rng.normal(0.0, rng.uniform(0.0, 8.0), size=small.shape)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def draw_split(kind: str, split: str, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 28 x 28, labels uint8 N) of a split, classes interleaved then shuffled by ``seed``."""
    labels = np.tile(np.arange(10), per_class)
    key = [seed, _KIND_KEY[kind], _SPLIT_KEY[split]]
    images = np.stack([draw_image(kind, int(lab), np.random.default_rng(np.random.SeedSequence([*key, i])))
                       for i, lab in enumerate(labels)])
    order = np.random.default_rng(np.random.SeedSequence([*key, 2**31])).permutation(len(labels))
    return images[order], labels[order].astype(np.uint8)


def _check_count(name: str, value: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= maximum:
        raise StandinError(f"{name} must be an integer in 1..{maximum}, got {value!r}")


def generate_mnist_standin(root: str | Path, train_per_class: int = 50, test_per_class: int = 20, seed: int = 0,
                           kind: str = "mnist", gzip: bool = False) -> Path:
    """Write the four idx files of a ``kind`` (``mnist`` or ``fashion_mnist``) stand-in into ``root`` and
    return ``root``: ``train_per_class`` training and ``test_per_class`` test images of each of the 10
    classes, in shuffled order. ``gzip``: write the ``.gz`` files instead. Existing files are replaced."""
    if kind not in KINDS:
        raise StandinError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    _check_count("train_per_class", train_per_class, MAX_TRAIN_PER_CLASS)
    _check_count("test_per_class", test_per_class, MAX_TEST_PER_CLASS)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise StandinError(f"seed must be an integer >= 0, got {seed!r}")
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StandinError(f"cannot create {root}: {e.strerror or e}") from e
    suffix = ".gz" if gzip else ""
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = draw_split(kind, split, int(per_class), int(seed))
        for name, array in zip(FILES[split], (images, labels)):
            try:
                write_idx(root / f"{name}{suffix}", array)
            except OSError as e:
                raise StandinError(f"cannot write {root / (name + suffix)}: {e.strerror or e}") from e
    return root
