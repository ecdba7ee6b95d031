"""The synthetic Cityscapes: layout, determinism, label images from cityscapesscripts, the evaluator."""

import importlib
import json
import os
import sys

import cv2
import numpy as np
import pytest
from cityscapesscripts.helpers.csHelpers import getCsFileInfo
from cityscapesscripts.preparation.json2labelImg import json2labelImg

from seg.data.labels import CLASS_NAMES, LABEL_IDS, NUM_CLASSES, label_to_train
from seg.data.synthetic import CITIES, VIDEO_NAME, generate


def video_frames(path):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def test_layout_names_and_cities_follow_cityscapes(synthetic_root):
    cities = {}
    for split, n in (("train", 4), ("val", 2), ("test", 1)):
        images = sorted((synthetic_root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        assert len(images) == n
        for img in images:
            info = getCsFileInfo(str(img))
            assert info.city == img.parent.name and info.type == "leftImg8bit"
            cities.setdefault(split, set()).add(info.city)
            assert info.city in CITIES[split]
            gt = (
                synthetic_root
                / "gtFine"
                / split
                / info.city
                / f"{info.city}_{info.sequenceNb}_{info.frameNb}_gtFine"
            )
            suffixes = ("polygons.json", "labelIds.png", "labelTrainIds.png", "instanceIds.png", "color.png")
            assert all(os.path.isfile(f"{gt}_{s}") == (split != "test") for s in suffixes)
    assert not (cities["train"] & cities["val"]) and not (cities["test"] & (cities["train"] | cities["val"]))


def test_label_images_are_the_cityscapesscripts_rasterisation_of_the_polygons(synthetic_root, tmp_path):
    seen = set()
    for js in sorted((synthetic_root / "gtFine").rglob("*_polygons.json")):
        data = json.loads(js.read_text())
        assert set(data) == {"imgHeight", "imgWidth", "objects"} and (
            data["imgHeight"],
            data["imgWidth"],
        ) == (64, 128)
        assert all(set(o) == {"label", "polygon"} and o["label"] in LABEL_IDS for o in data["objects"])
        prefix = str(js)[: -len("_polygons.json")]
        json2labelImg(str(js), str(tmp_path / "ids.png"), "ids")
        ids = cv2.imread(f"{prefix}_labelIds.png", cv2.IMREAD_UNCHANGED)
        assert np.array_equal(ids, cv2.imread(str(tmp_path / "ids.png"), cv2.IMREAD_UNCHANGED))
        train = cv2.imread(f"{prefix}_labelTrainIds.png", cv2.IMREAD_UNCHANGED)
        assert np.array_equal(train, label_to_train(ids))
        inst = cv2.imread(f"{prefix}_instanceIds.png", cv2.IMREAD_UNCHANGED)
        assert inst.dtype == np.uint16 and np.array_equal(np.where(inst >= 1000, inst // 1000, inst), ids)
        cars = [v for v in np.unique(inst) if v // 1000 == LABEL_IDS["car"]]
        assert len(cars) >= 2, "several car instances expected"
        seen |= set(np.unique(train).tolist())
    assert set(range(NUM_CLASSES)) <= seen, f"classes never drawn: {set(range(NUM_CLASSES)) - seen}"
    assert 255 in seen  # void classes (ego vehicle, ...) are present too


def test_generator_is_deterministic_for_a_seed(tmp_path):
    a = generate(tmp_path / "a", train=1, val=1, test=1, height=48, width=96, seed=3, video_frames=3)
    b = generate(tmp_path / "b", train=1, val=1, test=1, height=48, width=96, seed=3, video_frames=3)
    c = generate(tmp_path / "c", train=1, val=1, test=1, height=48, width=96, seed=4, video_frames=0)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.suffix != ".mp4")
    assert len(files) == 1 + 1 + 1 + 2 * 5
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.suffix != ".mp4")
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.suffix == ".png")
    fa, fb = video_frames(a / VIDEO_NAME), video_frames(b / VIDEO_NAME)
    assert len(fa) == 3 and all(np.array_equal(x, y) for x, y in zip(fa, fb, strict=True))
    assert fa[0].shape == (48, 96, 3)


def test_video_frames_move(synthetic_root):
    frames = video_frames(synthetic_root / VIDEO_NAME)
    assert len(frames) == 4 and frames[0].shape == (64, 128, 3)
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 1.0


def test_sizes_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"2048x4096 \(HxW\) out of range"):
        generate(tmp_path, height=2048, width=4096)


@pytest.fixture
def pixel_evaluator(synthetic_root, monkeypatch, tmp_path):
    """cityscapesscripts' pixel-level evaluator imported in-process, its traps disarmed."""
    monkeypatch.setenv("CITYSCAPES_DATASET", str(synthetic_root))  # read at import time
    sys.modules.pop("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling", None)
    ev = importlib.import_module("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")

    def fail(message):  # the module prints and calls sys.exit on errors
        raise AssertionError(f"cityscapes evaluator: {message}")

    monkeypatch.setattr(ev, "printError", fail)
    args = ev.args
    # instance scores and pixel accuracy go through np.in1d, removed in NumPy 2.4
    monkeypatch.setattr(args, "evalInstLevelScore", False)
    monkeypatch.setattr(args, "evalPixelAccuracy", False)
    monkeypatch.setattr(args, "JSONOutput", False)
    monkeypatch.setattr(args, "quiet", True)
    monkeypatch.setattr(args, "exportFile", str(tmp_path / "result.json"))
    yield ev
    sys.modules.pop("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling", None)


def test_official_evaluator_accepts_the_ground_truth(synthetic_root, pixel_evaluator):
    gts = sorted(str(p) for p in (synthetic_root / "gtFine" / "val").rglob("*_gtFine_labelIds.png"))
    assert len(gts) == 2
    result = pixel_evaluator.evaluateImgLists(gts, gts, pixel_evaluator.args)
    present = set()
    for g in gts:
        present |= set(label_to_train(cv2.imread(g, cv2.IMREAD_UNCHANGED)).ravel().tolist()) - {255}
    scores = result["classScores"]
    for t, name in enumerate(CLASS_NAMES):
        if t in present:
            assert scores[name] == pytest.approx(1.0), name
        else:
            assert np.isnan(scores[name]), name
    assert result["averageScoreClasses"] == pytest.approx(1.0)
    assert len(present) >= 15
