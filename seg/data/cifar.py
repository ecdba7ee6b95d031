"""CIFAR-10 and CIFAR-100 read from the official "python version" archives, without torchvision.

Layout (the extracted ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``)::

    <root>/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch, batches.meta
    <root>/cifar-100-python/train, test, meta

Each file is a Python-2 pickle of a dict with bytes keys: ``b'data'`` uint8 N x 3072 (1024 red, 1024 green,
1024 blue values of a row-major 32x32 image), ``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` (CIFAR-100), and
in the meta file ``b'label_names'`` / ``b'fine_label_names'``. torchvision's readers md5-check each file
against the official one, which rejects the generated stand-in (:mod:`seg.data.cifar_standin`); this one
checks structure instead. Unpickling allows only the few globals a numpy array needs, so a file that is not
CIFAR data cannot run code.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seg.data.arrays import ArrayDataset
from seg.data.cityscapes import DatasetError
from seg.data.classification_transforms import CIFAR_NAMES, build_classification_transforms, check_dataset_name

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
ROW_LENGTH = 3 * 32 * 32


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant lives and which keys it uses."""

    title: str
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int


LAYOUTS: dict[str, CifarLayout] = {
    "cifar10": CifarLayout(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
    ),
    "cifar100": CifarLayout(
        title="CIFAR-100",
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        num_classes=100,
    ),
}


def layout_help(layout: CifarLayout, root: Path) -> str:
    files = ", ".join((*layout.train_files, *layout.test_files, layout.meta_file))
    return (
        f"expected the official {layout.title} python version: {root / layout.folder}/ holding {files}. "
        f"Download {layout.archive} ('{layout.title} python version') from {CIFAR_URL} and extract it into "
        f"{root} (tar -xzf {layout.archive} -C {root}). "
        "No download is needed to try the project: `python tools/make_cifar_standin.py --root DIR` writes a "
        "small generated CIFAR-10-format set."
    )


def _missing_hint(layout: CifarLayout, root: Path) -> str:
    """What probably went wrong when the folder is absent."""
    if root.name == layout.folder:
        return f" (root should be the folder that contains {layout.folder}/, i.e. {root.parent})"
    if (root / layout.archive).is_file():
        return f" ({root / layout.archive} is there but not extracted)"
    stem = layout.folder.rsplit("-", 1)[0]  # cifar-10-batches / cifar-100
    for other in (f"{stem}-bin", f"{stem}-binary", f"{stem}-mat", f"{stem}-matlab"):
        if (root / other).exists():
            return f" ({root / other} is the binary/MATLAB version; this reader needs the python version)"
    return ""


# --------------------------------------------------------------------------------------------
# reading one archive file


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays (as the official files hold), nothing else."""

    ALLOWED = {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which CIFAR data does not hold")
        return super().find_class(module, name)


def _key(d: dict, key: bytes) -> Any:
    """``d[key]``, also accepting the str key of a file re-pickled under Python 3."""
    if key in d:
        return d[key]
    return d.get(key.decode("ascii"))


def unpickle(path: Path, what: str) -> dict:
    """The dict in a CIFAR pickle file; a missing, damaged or non-dict file raises :class:`DatasetError`."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DatasetError(f"{what} file {path} is missing") from None
    except OSError as e:
        raise DatasetError(f"cannot read {what} file {path}: {e.strerror or e}") from e
    except Exception as e:  # truncated or not a pickle: UnpicklingError, EOFError, ValueError, ...
        raise DatasetError(f"{what} file {path} is damaged or not a CIFAR python-version file ({e})") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{what} file {path} holds a {type(obj).__name__}, not the dict of a CIFAR batch")
    return obj


def read_batch(path: Path, label_key: bytes, num_classes: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 32 x 32 x 3 RGB, labels int64 N) of one batch file, checked."""
    d = unpickle(path, what)
    data, labels = _key(d, b"data"), _key(d, label_key)
    if data is None or labels is None:
        keys = ", ".join(repr(k) for k in d)
        raise DatasetError(f"{what} file {path} has keys {keys}; expected b'data' and {label_key!r}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_LENGTH:
        raise DatasetError(
            f"{what} file {path}: b'data' is {data.dtype} of shape {data.shape}; expected uint8 N x {ROW_LENGTH}"
        )
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DatasetError(f"{what} file {path}: {label_key!r} is not a list of integers") from None
    if labels.shape != (len(data),):
        raise DatasetError(f"{what} file {path}: {len(data)} images but {label_key!r} has shape {labels.shape}")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise DatasetError(f"{what} file {path}: label {int(labels[bad][0])} outside 0..{num_classes - 1}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-major rows -> H, W, C
    return np.ascontiguousarray(images), labels


def read_class_names(path: Path, names_key: bytes, num_classes: int, what: str) -> list[str]:
    d = unpickle(path, what)
    names = _key(d, names_key)
    if not isinstance(names, (list, tuple)) or len(names) != num_classes:
        got = f"{len(names)} names" if isinstance(names, (list, tuple)) else "no such list"
        raise DatasetError(f"{what} meta file {path}: {names_key!r} has {got}; expected {num_classes} class names")
    try:
        return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    except UnicodeDecodeError:
        raise DatasetError(f"{what} meta file {path}: class names are not text") from None


# --------------------------------------------------------------------------------------------
# the dataset


class CifarDataset(ArrayDataset):
    """CIFAR-10 or CIFAR-100 (fine labels); items are ``(transform(image=rgb)["image"], label)``.

    Args:
        root: folder holding ``cifar-10-batches-py/`` or ``cifar-100-python/``.
        name: ``cifar10`` or ``cifar100``.
        train: the 50k training images (all five batches for CIFAR-10) or the 10k test images.
        transform: an albumentations-style callable ``f(image=rgb_uint8_hwc) -> {"image": ...}``. None: the
            reference's test pipeline of ``name`` (normalise only, no augmentation); for training pass
            ``build_classification_transforms(name, train=True)``.

    ``images`` is uint8 N x 32 x 32 x 3 (RGB), ``targets`` a list of int, ``classes`` the names from the meta
    file. Labels come out as 0-d int64 tensors. Every file is read and checked at construction.
    """

    def __init__(
        self,
        root: str | Path,
        name: str,
        train: bool,
        transform: Callable[..., dict[str, Any]] | None = None,
    ):
        check_dataset_name(name, CIFAR_NAMES)
        self.root = Path(root)
        self.name = name
        self.train = train
        self.layout = layout = LAYOUTS[name]
        folder = self.root / layout.folder
        if not folder.is_dir():
            where = "does not exist" if not self.root.exists() else f"has no {layout.folder}/ folder"
            raise DatasetError(
                f"{layout.title} root {self.root} {where}{_missing_hint(layout, self.root)}; "
                + layout_help(layout, self.root)
            )
        files = layout.train_files if train else layout.test_files
        missing = [folder / f for f in (*files, layout.meta_file) if not (folder / f).is_file()]
        if missing:
            raise DatasetError(
                f"{layout.title} file {missing[0]} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; "
                + layout_help(layout, self.root)
            )
        what = layout.title
        self.classes = read_class_names(folder / layout.meta_file, layout.names_key, layout.num_classes, what)
        parts = [read_batch(folder / f, layout.label_key, layout.num_classes, what) for f in files]
        self.images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        labels = np.concatenate([p[1] for p in parts])
        if len(labels) == 0:
            raise DatasetError(f"{layout.title} {'train' if train else 'test'} files under {folder} hold no images")
        self.targets: list[int] = labels.tolist()
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform if transform is not None else build_classification_transforms(name, train=False)

    @property
    def num_classes(self) -> int:
        return self.layout.num_classes
