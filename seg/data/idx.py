"""The idx file format of MNIST and Fashion-MNIST (http://yann.lecun.com/exdb/mnist/), read and written
without torchvision.

A file is a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32 sizes, then the
values in C order, big-endian. The official files are ``ubyte`` (type 0x08): images ``N x 28 x 28`` (magic
2051, "idx3"), labels ``N`` (magic 2049, "idx1"). A ``.gz`` file is decompressed on the fly.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from seg.data.cityscapes import DatasetError

# idx type byte -> big-endian numpy dtype
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_TYPE_CODES = {dt.str[1:]: code for code, dt in IDX_TYPES.items()}  # "u1" -> 0x08, ...


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{what} {path} not found") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a cut-off or corrupt download
        raise DatasetError(f"{what} {path} is damaged: not a complete gzip file ({e})") from e
    except OSError as e:
        raise DatasetError(f"cannot read {what} {path}: {e.strerror or e}") from e


def parse_idx(data: bytes, path: Path, what: str = "idx file") -> np.ndarray:
    """The array held by the idx bytes ``data`` (native byte order); anything malformed raises
    :class:`DatasetError` naming ``path``, what was found and what an idx file holds."""
    if len(data) < 4:
        raise DatasetError(f"{what} {path} is damaged: {len(data)} bytes, shorter than the 4-byte idx magic number")
    zero, code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or code not in IDX_TYPES or ndim == 0:
        raise DatasetError(
            f"{what} {path} is not an idx file: magic number 0x{data[:4].hex()}, expected 0x0000 then a type byte "
            f"({', '.join(f'0x{c:02x}' for c in IDX_TYPES)}) and the number of dimensions (e.g. 0x00000803 for "
            "images, 0x00000801 for labels)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{what} {path} is truncated: {len(data)} bytes, shorter than its {header}-byte header")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_TYPES[code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        shape = " x ".join(map(str, dims))
        problem = "truncated" if len(data) < expected else "damaged (trailing bytes)"
        raise DatasetError(
            f"{what} {path} is {problem}: its header gives {shape} {dtype.name} values, {expected} bytes in all, "
            f"but the file has {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path, what: str = "idx file") -> np.ndarray:
    """The array in the idx file ``path`` (``.gz`` decompressed). Raises :class:`DatasetError`."""
    path = Path(path)
    return parse_idx(_read_bytes(path, what), path, what)


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` in the idx format (its dtype must be one idx holds: uint8, int8, int16, int32, float32,
    float64; at least one dimension)."""
    array = np.asarray(array)
    code = _TYPE_CODES.get(array.dtype.str[1:])
    if code is None or array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"idx holds uint8/int8/int16/int32/float32/float64 arrays of 1..255 dimensions, "
                         f"got {array.dtype} of shape {array.shape}")
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=IDX_TYPES[code]).tobytes()


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an idx file (gzip-compressed when ``path`` ends in ``.gz``), replacing ``path``
    only once the whole file is written."""
    path = Path(path)
    data = idx_bytes(array)
    tmp = path.with_name(path.name + ".tmp")
    if path.name.endswith(".gz"):
        # mtime 0: the same array gives the same bytes
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
            f.write(data)
    else:
        tmp.write_bytes(data)
    tmp.replace(path)
