"""seg.media: image and video files round-trip in RGB order; unreadable or unwritable files are MediaErrors."""

import numpy as np
import pytest

from seg.errors import UserError
from seg.media import (
    MediaError,
    VideoReader,
    VideoWriter,
    expand_inputs,
    read_image_rgb,
    read_mask,
    write_image,
)


def test_images_round_trip_in_rgb_order(tmp_path):
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 200  # pure red: a BGR/RGB mix-up would read it back as blue
    path = write_image(tmp_path / "sub" / "red.png", rgb)  # the folder is created
    assert np.array_equal(read_image_rgb(path), rgb)
    ids = np.arange(24, dtype=np.uint8).reshape(4, 6)
    assert np.array_equal(read_mask(write_image(tmp_path / "ids.png", ids)), ids)
    deep = np.full((2, 3), 40000, np.uint16)
    write_image(tmp_path / "deep.png", deep)
    with pytest.raises(MediaError, match="deep.png must be a single-channel 8-bit PNG"):
        read_mask(tmp_path / "deep.png")


def test_unreadable_and_unwritable_files_name_the_file(tmp_path):
    assert issubclass(MediaError, UserError)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(MediaError, match=r"cannot read image .*bad.png"):
        read_image_rgb(bad)
    with pytest.raises(MediaError, match=r"cannot read label .*bad.png"):
        read_mask(bad, "label")
    with pytest.raises(MediaError, match=r"cannot read image .*missing.png"):
        read_image_rgb(tmp_path / "missing.png")
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder is expected")
    with pytest.raises(MediaError, match=r"cannot write .*file/out.png"):
        write_image(blocker / "out.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="uint8 or uint16"):
        write_image(tmp_path / "f.png", np.zeros((2, 2), np.float32))


def test_video_round_trip_keeps_frames_size_and_fps(tmp_path):
    path = tmp_path / "clip.mp4"
    with VideoWriter(path, 5.0, (32, 16)) as writer:
        for t in range(5):
            writer.write(np.full((16, 32, 3), 40 * t, np.uint8))
    with VideoReader(path) as reader:
        assert reader.size == (32, 16) and reader.fps == pytest.approx(5.0)
        batches = list(reader.batches(2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert batches[0][0].shape == (16, 32, 3) and abs(int(batches[-1][0].mean()) - 160) <= 3
    not_video = tmp_path / "fake.mp4"
    not_video.write_bytes(b"\x00" * 64)
    with pytest.raises(MediaError, match="fake.mp4"):
        VideoReader(not_video)


def test_expand_inputs_reports_what_matched_nothing(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        write_image(tmp_path / folder / "x.png", np.zeros((2, 2, 3), np.uint8))
    found, errors = expand_inputs([str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "*.png"), "nowhere.png"])
    assert [stem for _, stem in found] == ["a_x", "b_x"]  # the same name twice: the folder tells them apart
    assert errors == ["nowhere.png: no such file or folder"]
