"""Colour masks use exactly the Cityscapes palette (from cityscapesscripts); overlays blend as stated."""

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import trainId2label

from seg.media import read_image_rgb, read_mask
from seg.visualize import colorize, overlay, save_outputs, side_by_side


def test_colorize_uses_the_cityscapes_palette_and_black_for_ignore():
    ids = np.array([list(range(19)) + [255]], dtype=np.uint8)
    color = colorize(ids)
    assert color.shape == (1, 20, 3) and color.dtype == np.uint8
    for t in range(19):
        assert tuple(color[0, t]) == trainId2label[t].color
    assert tuple(color[0, 19]) == (0, 0, 0)
    # The set of colours in any mask is a subset of the palette plus black.
    allowed = {trainId2label[t].color for t in range(19)} | {(0, 0, 0)}
    rand = np.random.default_rng(0).choice(list(range(19)) + [255], size=(16, 16)).astype(np.int64)
    assert {tuple(c) for c in colorize(rand).reshape(-1, 3)} <= allowed


def test_colorize_rejects_non_trainids():
    with pytest.raises(ValueError, match="not a trainId"):
        colorize(np.array([[19]], dtype=np.uint8))
    with pytest.raises(ValueError, match="H,W"):
        colorize(np.zeros((2, 2, 3), dtype=np.uint8))


def test_overlay_blends_at_the_given_opacity():
    image = np.full((2, 2, 3), 100, np.uint8)
    color = np.full((2, 2, 3), 200, np.uint8)
    assert np.all(overlay(image, color, 0.0) == 100)
    assert np.all(overlay(image, color, 1.0) == 200)
    assert np.all(overlay(image, color, 0.25) == 125)
    with pytest.raises(ValueError):
        overlay(image, color, 1.5)
    assert side_by_side(image, color).shape == (2, 4, 3)


def test_titled_row_places_each_image_under_its_caption() -> None:
    from seg.visualize import GAP, TITLE_HEIGHT, titled_row

    images = [np.full((8, 10, 3), v, dtype=np.uint8) for v in (10, 100, 200)]
    row = titled_row(images, ["input", "ground truth", "prediction"])
    assert row.shape == (8 + TITLE_HEIGHT, 3 * 10 + 2 * GAP, 3)
    for k, v in enumerate((10, 100, 200)):
        x = k * (10 + GAP)
        assert (row[TITLE_HEIGHT:, x:x + 10] == v).all()
    assert (row[TITLE_HEIGHT:, 10:10 + GAP] == 255).all()  # the gap
    assert (row[:TITLE_HEIGHT] < 255).any()  # some caption text was drawn
    with pytest.raises(ValueError, match="one title per image"):
        titled_row(images, ["input"])
    with pytest.raises(ValueError, match="one shape"):
        titled_row([images[0], np.zeros((4, 10, 3), np.uint8)], ["a", "b"])


def test_save_outputs_writes_the_documented_files(tmp_path):
    image = np.full((3, 4, 3), 100, np.uint8)
    ids = np.array([[0, 1, 2, 255]] * 3, np.uint8)
    written = save_outputs(image, ids, tmp_path, "x", ["mask", "color", "overlay"], 0.5)
    assert [p.name for p in written] == ["x_mask.png", "x_color.png", "x_overlay.png"]
    assert np.array_equal(read_mask(written[0]), ids)
    assert tuple(read_image_rgb(written[1])[0, 0]) == (128, 64, 128)  # road in the Cityscapes palette
