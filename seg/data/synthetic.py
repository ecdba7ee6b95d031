"""A generated Cityscapes: procedural street scenes in the official layout, for the demo and the tests.

Each scene (:mod:`seg.data.street_scene`: the drawing) is a list of Cityscapes polygon objects (the real
``*_gtFine_polygons.json`` schema) covering all 19 evaluated classes plus some void ones; this module writes
the files. The label images are rasterised from those polygons by
cityscapesscripts' own ``createLabelImage`` / ``createInstanceImage`` (what ``json2labelImg`` /
``json2instanceImg`` call), and the photo is rendered from the same rasterisation: per-class colour ranges
that overlap between classes, per-class textures, per-instance colours, a lighting gradient and noise, so a
network must use texture and shape rather than a colour lookup. A short video of moving objects is written
for video inference. Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from cityscapesscripts.preparation.json2labelImg import createLabelImage
from PIL import Image, ImageDraw

from seg.data.labels import LABEL_IDS
from seg.data.street_scene import Scene, build_scene
from seg.errors import UserError
from seg.media import MediaError

# Distinct (fictional, underscore-free: cityscapesscripts splits file names on '_') cities per split.
CITIES: dict[str, tuple[str, ...]] = {
    "train": ("alderton", "brookfield", "cresthaven"),
    "val": ("dunmore", "eastwick"),
    "test": ("fairhaven",),
}
FRAME = 19  # Cityscapes annotates the 20th frame of each 30-frame snippet: <city>_<seq>_000019
VIDEO_NAME = "demoVideo/synthetic_sequence.mp4"
MAX_SIZE = (1024, 2048)
MIN_SIZE = (32, 64)

class SyntheticError(UserError, ValueError):
    """A synthetic-set parameter (size, image count) is out of range; the message names it."""


# --------------------------------------------------------------------------------------------
# rasterising (cityscapesscripts) and rendering

# Appearance by label name: base RGB, per-instance colour jitter, texture -> amplitude. Base colours overlap
# on purpose (road/sidewalk, building/wall, vegetation/terrain, the vehicles share one paint palette).
_PAINT = np.array(
    [[180, 30, 30], [30, 60, 150], [215, 215, 215], [40, 40, 45], [140, 140, 150], [220, 170, 40]]
)
_LOOK: dict[str, tuple[tuple[int, int, int], int, dict[str, float]]] = {
    "road": ((95, 92, 98), 8, {"grain": 0.10, "blob": 0.10}),
    "sidewalk": ((118, 110, 112), 10, {"tiles": 0.30, "grain": 0.05}),
    "parking": ((105, 95, 100), 8, {"hstripe": 0.2}),
    "ground": ((110, 100, 85), 8, {"blob": 0.2}),
    "building": ((115, 105, 100), 30, {"windows": 0.45, "blob": 0.08}),
    "wall": ((120, 108, 100), 15, {"bricks": 0.30}),
    "fence": ((130, 120, 105), 15, {"pickets": 0.55}),
    "guard rail": ((160, 160, 165), 5, {"hstripe": 0.3}),
    "pole": ((125, 125, 128), 10, {"vstripe": 0.15}),
    "traffic light": ((35, 35, 35), 5, {"lamps": 1.2}),
    "traffic sign": ((200, 40, 40), 0, {"grain": 0.05}),
    "vegetation": ((70, 110, 45), 15, {"leaves": 0.45}),
    "terrain": ((105, 125, 65), 10, {"grass": 0.25}),
    "sky": ((140, 180, 225), 10, {"clouds": 0.12}),
    "person": ((90, 70, 60), 60, {"grain": 0.10}),
    "rider": ((90, 70, 60), 60, {"grain": 0.10}),
    "car": ((0, 0, 0), 20, {"shine": 0.25}),
    "truck": ((0, 0, 0), 20, {"hstripe": 0.25}),
    "bus": ((0, 0, 0), 20, {"busband": 0.55}),
    "train": ((0, 0, 0), 15, {"windows": 0.4}),
    "motorcycle": ((0, 0, 0), 15, {"grain": 0.2}),
    "bicycle": ((50, 45, 45), 20, {"grain": 0.2}),
    "license plate": ((225, 225, 215), 5, {}),
    "rail track": ((95, 80, 70), 10, {"vstripe": 0.35}),
    "static": ((100, 110, 120), 20, {"grain": 0.1}),
    "dynamic": ((111, 74, 30), 20, {"grain": 0.1}),
    "ego vehicle": ((25, 25, 30), 5, {"grain": 0.05}),
}
_SIGN_COLOURS = np.array([[200, 30, 30], [30, 70, 180], [230, 200, 30]])
_PAINTED = ("car", "truck", "bus", "train", "motorcycle")


def _textures(rng: np.random.Generator, h: int, w: int, names: set[str]) -> dict[str, np.ndarray]:
    """Zero-mean-ish texture fields in about [-1, 1] at full resolution (only those needed)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    s = max(h / 256.0, 0.25)  # texture scale follows the image size

    def smooth_noise(cell: float) -> np.ndarray:
        gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
        small = rng.standard_normal((gh, gw)).astype(np.float32)
        return np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), -2, 2) / 2

    makers: dict[str, Callable[[], np.ndarray]] = {
        "grain": lambda: np.clip(rng.standard_normal((h, w)).astype(np.float32) / 2, -1, 1),
        "blob": lambda: smooth_noise(40 * s),
        "clouds": lambda: smooth_noise(60 * s) + 0.5 * (yy / h - 0.5),
        "leaves": lambda: np.sign(smooth_noise(4 * s)) * 0.7 + 0.3 * smooth_noise(12 * s),
        "grass": lambda: smooth_noise(3 * s) * 0.4 + np.sin(xx / (1.3 * s)) * 0.6,
        "tiles": lambda: np.where((xx % (14 * s) < 1.5 * s) | (yy % (8 * s) < 1.5 * s), -1.0, 0.2).astype(
            np.float32
        ),
        "windows": lambda: np.where((xx % (12 * s) < 6 * s) & (yy % (16 * s) < 9 * s), -1.0, 0.3).astype(
            np.float32
        ),
        "bricks": lambda: np.where(yy % (5 * s) < 1.2 * s, -1.0, 0.25).astype(np.float32),
        "pickets": lambda: np.sign(np.sin(xx / (1.6 * s))).astype(np.float32),
        "hstripe": lambda: np.sin(yy / (2.0 * s)).astype(np.float32),
        "vstripe": lambda: np.sin(xx / (1.5 * s)).astype(np.float32),
        "lamps": lambda: np.where(np.sin(yy / (1.6 * s)) > 0.6, 1.0, -0.2).astype(np.float32),
        "shine": lambda: np.sin(yy / (6.0 * s)).astype(np.float32),
        "busband": lambda: np.where((yy % (24 * s) > 5 * s) & (yy % (24 * s) < 12 * s), -1.0, 0.2).astype(
            np.float32
        ),
    }
    return {k: makers[k]() for k in sorted(names)}


def _rasterise(objects: list[tuple[str, list[list[int]]]], w: int, h: int) -> Annotation:
    ann = Annotation()
    ann.fromJsonText(json.dumps(_json(objects, w, h)))
    return ann


def _json(objects: list[tuple[str, list[list[int]]]], w: int, h: int) -> dict:
    return {
        "imgHeight": h,
        "imgWidth": w,
        "objects": [{"label": lab, "polygon": poly} for lab, poly in objects],
    }


def render(
    rng: np.random.Generator, objects: list[tuple[str, list[list[int]]]], label_ids: np.ndarray
) -> np.ndarray:
    """Photo (RGB uint8) of a scene from its label map and polygons (for per-object colours)."""
    h, w = label_ids.shape
    # Object index map, rasterised by PIL exactly like cityscapesscripts' label images.
    index_img = Image.new("I", (w, h), 0)
    draw = ImageDraw.Draw(index_img)
    for k, (_lab, poly) in enumerate(objects):
        draw.polygon([tuple(p) for p in poly], fill=k + 1)
    index = np.asarray(index_img, dtype=np.int64)
    colours = np.zeros((len(objects) + 1, 3), np.float32)
    for k, (lab, _poly) in enumerate(objects):
        base, jitter, _tex = _LOOK[lab]
        if lab in _PAINTED:
            base = _PAINT[rng.integers(len(_PAINT))]
        elif lab == "traffic sign":
            base = _SIGN_COLOURS[rng.integers(len(_SIGN_COLOURS))]
        colours[k + 1] = np.clip(np.asarray(base, np.float32) + rng.uniform(-jitter, jitter, 3), 0, 255)
    img = colours[index]
    # Class textures, selected by the label map (license plates are car there and keep their plain look).
    names = {lab for lab, _ in objects}
    needed = {t for lab in names for t in _LOOK[lab][2]}
    fields = _textures(rng, h, w, needed)
    for lab in names:
        tex = _LOOK[lab][2]
        lid = LABEL_IDS[lab]
        if not tex or lid < 0:
            continue
        m = label_ids == lid
        if not m.any():
            continue
        mod = sum(amp * fields[name][m] for name, amp in tex.items())
        img[m] *= 1.0 + np.asarray(mod, np.float32)[:, None]
    # Lighting: a global gain and a linear gradient, then sensor noise and a slight blur.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gain = rng.uniform(0.8, 1.15) * (
        1 + rng.uniform(-0.3, 0.3) * (xx / w - 0.5) + rng.uniform(-0.2, 0.2) * (yy / h - 0.5)
    )
    img *= gain[..., None]
    img += rng.normal(0, 5, img.shape).astype(np.float32)
    img = cv2.GaussianBlur(img, (3, 3), 0.6)
    return np.clip(img, 0, 255).astype(np.uint8)


def _save_png(path: Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), array):
        raise MediaError(f"cannot write {path} (unwritable folder?)")


def write_sample(rng: np.random.Generator, scene: Scene, image_path: Path, gt_prefix: Path | None) -> None:
    """Write one frame: the photo, and with ``gt_prefix`` the polygons JSON and the four label images."""
    w, h = scene.width, scene.height
    objects = scene.objects()
    ann = _rasterise(objects, w, h)
    label_ids = np.asarray(createLabelImage(ann, "ids"), dtype=np.uint8)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    _save_png(image_path, cv2.cvtColor(render(rng, objects, label_ids), cv2.COLOR_RGB2BGR))
    if gt_prefix is None:
        return
    gt_prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{gt_prefix}_polygons.json", "w") as f:
        json.dump(_json(objects, w, h), f, indent=4)
    _save_png(Path(f"{gt_prefix}_labelIds.png"), label_ids)
    _save_png(Path(f"{gt_prefix}_labelTrainIds.png"), np.asarray(createLabelImage(ann, "trainIds"), np.uint8))
    createLabelImage(ann, "color").save(f"{gt_prefix}_color.png")
    # Pillow cannot write mode-I PNGs: store the instance image as 16-bit (ids are < 34000).
    _save_png(
        Path(f"{gt_prefix}_instanceIds.png"), np.asarray(createInstanceImage(ann, "ids")).astype(np.uint16)
    )


def _check_size(height: int, width: int) -> None:
    if not (MIN_SIZE[0] <= height <= MAX_SIZE[0] and MIN_SIZE[1] <= width <= MAX_SIZE[1]):
        raise SyntheticError(
            f"synthetic image size {height}x{width} (HxW) out of range: height {MIN_SIZE[0]}..{MAX_SIZE[0]}, "
            f"width {MIN_SIZE[1]}..{MAX_SIZE[1]}"
        )


def write_video(path: Path, frames: int, height: int, width: int, seed: int, fps: int = 10) -> None:
    """A short clip of one scene whose vehicles, riders and pedestrians move (mp4, OpenCV 'mp4v')."""
    _check_size(height, width)
    rng = np.random.default_rng([seed, 1000])
    scene = build_scene(rng, width, height)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise MediaError(f"cannot write video {path} (OpenCV mp4v writer)")
    try:
        for t in range(frames):
            objects = scene.objects(float(t))
            label_ids = np.asarray(createLabelImage(_rasterise(objects, width, height), "ids"), np.uint8)
            # Same lighting/colours every frame: reseed the renderer per frame from the scene seed.
            frame = render(np.random.default_rng([seed, 1001]), objects, label_ids)
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def generate(
    root: str | Path,
    train: int = 40,
    val: int = 10,
    test: int = 5,
    height: int = 256,
    width: int = 512,
    seed: int = 0,
    video_frames: int = 20,
) -> Path:
    """Write a synthetic Cityscapes under ``root`` (leftImg8bit/, gtFine/, demoVideo/); returns ``root``.

    The test split gets images only (no labels), like the public test set. Each image depends only on
    (seed, split, index), so sets of different sizes share their first images.
    """
    _check_size(height, width)
    root = Path(root)
    for split_no, (split, count) in enumerate((("train", train), ("val", val), ("test", test))):
        if count < 0:
            raise SyntheticError(f"number of {split} images must be >= 0, got {count}")
        cities = CITIES[split]
        for i in range(count):
            rng = np.random.default_rng([seed, split_no, i])
            city = cities[i % len(cities)]
            name = f"{city}_{i // len(cities):06d}_{FRAME:06d}"
            image_path = root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"
            gt_prefix = None if split == "test" else root / "gtFine" / split / city / f"{name}_gtFine"
            write_sample(rng, build_scene(rng, width, height), image_path, gt_prefix)
    if video_frames > 0:
        write_video(root / VIDEO_NAME, video_frames, height, width, seed)
    return root
