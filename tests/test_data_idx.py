"""The idx format (seg/data/idx.py): byte layout written by hand, round trips plain and gzipped, and one-line
errors for short, foreign, truncated and padded files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from seg.data.cityscapes import DatasetError
from seg.data.idx import idx_bytes, read_idx, write_idx


def test_bytes_follow_the_published_layout() -> None:
    # http://yann.lecun.com/exdb/mnist/: 0x00 0x00, type (0x08 ubyte), ndim, big-endian uint32 sizes, data.
    a = np.array([[1, 2, 3], [4, 5, 255]], np.uint8)
    assert idx_bytes(a) == bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 255])
    # multi-byte values are big-endian: 0x0C int32
    assert idx_bytes(np.array([258], np.int32)) == bytes([0, 0, 0x0C, 1, 0, 0, 0, 1, 0, 0, 1, 2])


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_round_trip(tmp_path: Path, dtype, suffix: str) -> None:
    rng = np.random.default_rng(0)
    a = (rng.normal(size=(5, 3, 4)) * 50).astype(dtype)
    path = tmp_path / f"a-idx3{suffix}"
    write_idx(path, a)
    b = read_idx(path)
    assert b.dtype == np.dtype(dtype) and b.shape == a.shape and np.array_equal(a, b)
    assert b.flags.writeable  # a copy in native order, not a view of the file's bytes
    if suffix:
        assert gzip.decompress(path.read_bytes()) == idx_bytes(a)
        write_idx(tmp_path / "again.gz", a)  # the same array gives the same bytes
        assert (tmp_path / "again.gz").read_bytes() == path.read_bytes()


def test_one_dimension_and_empty_arrays(tmp_path: Path) -> None:
    write_idx(tmp_path / "labels", np.arange(7, dtype=np.uint8))
    assert read_idx(tmp_path / "labels").tolist() == list(range(7))
    write_idx(tmp_path / "empty", np.zeros((0, 28, 28), np.uint8))
    assert read_idx(tmp_path / "empty").shape == (0, 28, 28)


def _error(path: Path) -> str:
    with pytest.raises(DatasetError) as e:
        read_idx(path, "MNIST image file")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in _error(tmp_path / "nothing")


def test_bad_magic_names_what_an_idx_file_starts_with(tmp_path: Path) -> None:
    path = tmp_path / "png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    msg = _error(path)
    assert "not an idx file" in msg and "0x89504e47" in msg and "0x00000803" in msg
    path.write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 0]))  # unknown type byte
    assert "not an idx file" in _error(path)
    path.write_bytes(b"\x00\x08")
    assert "shorter than the 4-byte" in _error(path)


def test_truncated_header_and_data(tmp_path: Path) -> None:
    data = idx_bytes(np.zeros((4, 28, 28), np.uint8))
    path = tmp_path / "cut"
    path.write_bytes(data[:10])
    assert "truncated" in _error(path) and "16-byte header" in _error(path)
    path.write_bytes(data[:-1])
    msg = _error(path)
    assert "truncated" in msg and "4 x 28 x 28" in msg and str(len(data)) in msg and str(len(data) - 1) in msg
    path.write_bytes(data + b"\x00")
    assert "trailing bytes" in _error(path)


def test_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "a.gz"
    write_idx(path, np.arange(1000, dtype=np.int32))
    path.write_bytes(path.read_bytes()[:-20])
    assert "damaged" in _error(path)


def test_unsupported_arrays_are_refused() -> None:
    for bad in (np.zeros(3, np.uint16), np.zeros(3, np.int64), np.array(5, np.uint8)):
        with pytest.raises(ValueError, match="idx holds"):
            idx_bytes(bad)
