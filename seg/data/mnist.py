"""MNIST and Fashion-MNIST read directly from the four official idx files under one folder.

Layout (the files as distributed, plain or still gzipped; nothing is downloaded)::

    <root>/train-images-idx3-ubyte   60000 x 28 x 28 uint8    (or train-images-idx3-ubyte.gz)
    <root>/train-labels-idx1-ubyte   60000 uint8, 0..9
    <root>/t10k-images-idx3-ubyte    10000 x 28 x 28 uint8
    <root>/t10k-labels-idx1-ubyte    10000 uint8, 0..9

Fashion-MNIST (github.com/zalandoresearch/fashion-mnist) uses the same four names and format. The header is
parsed here (:mod:`seg.data.idx`) and checked: magic number, 28 x 28 images, as many labels as images, labels
0..9. A missing or damaged file is a one-line :class:`~seg.data.cityscapes.DatasetError` naming the file,
what was expected and where the files go. ``python tools/make_mnist_standin.py`` writes a small generated set
in this exact format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seg.data.arrays import ArrayDataset
from seg.data.cityscapes import DatasetError
from seg.data.classification_transforms import MNIST_NAMES, build_classification_transforms, check_dataset_name
from seg.data.idx import read_idx

IMAGE_SIZE = 28
NUM_CLASSES = 10
IMAGES_MAGIC, LABELS_MAGIC = 0x0803, 0x0801  # ubyte, 3 dims / ubyte, 1 dim
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_FILES = (*FILES["train"], *FILES["test"])


@dataclass(frozen=True)
class MnistLayout:
    title: str
    url: str
    classes: tuple[str, ...]


LAYOUTS: dict[str, MnistLayout] = {
    "mnist": MnistLayout("MNIST", "http://yann.lecun.com/exdb/mnist/", tuple(str(i) for i in range(10))),
    "fashion_mnist": MnistLayout(
        "Fashion-MNIST",
        "https://github.com/zalandoresearch/fashion-mnist",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
}
# Where torchvision's MNIST/FashionMNIST classes keep the same files (a common reason for "not found").
TORCHVISION_FOLDERS = {"mnist": "MNIST/raw", "fashion_mnist": "FashionMNIST/raw"}


def where_files_go(name: str, root: Path) -> str:
    layout = LAYOUTS[name]
    return (f"put the four official {layout.title} idx files ({', '.join(ALL_FILES)}; .gz also read; "
            f"from {layout.url}) in {root}")


def find_file(root: Path, name: str, dataset: str) -> Path:
    """``root/name``, or ``root/name.gz`` when only that exists; a one-line error when neither does."""
    for path in (root / name, root / f"{name}.gz"):
        if path.is_file():
            return path
    hint = ""
    tv = root / TORCHVISION_FOLDERS[dataset]
    if (tv / name).is_file() or (tv / f"{name}.gz").is_file():
        hint = f" ({tv} holds them in torchvision's layout; use that folder as the root)"
    raise DatasetError(f"{root / name} not found{hint}: {where_files_go(dataset, root)}")


def read_images(path: Path, title: str) -> np.ndarray:
    what = f"{title} image file"
    images = read_idx(path, what)
    if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.ndim != 3:
        raise DatasetError(f"{what} {path} holds {images.dtype} of shape {images.shape}; expected "
                           f"uint8 N x {IMAGE_SIZE} x {IMAGE_SIZE} (idx magic 0x{IMAGES_MAGIC:08x})")
    return images


def read_labels(path: Path, title: str) -> np.ndarray:
    what = f"{title} label file"
    labels = read_idx(path, what)
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(f"{what} {path} holds {labels.dtype} of shape {labels.shape}; expected uint8 N "
                           f"(idx magic 0x{LABELS_MAGIC:08x})")
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise DatasetError(f"{what} {path}: label {int(labels.max())} outside 0..{NUM_CLASSES - 1}")
    return labels.astype(np.int64)


class MnistDataset(ArrayDataset):
    """MNIST or Fashion-MNIST; items are ``(transform(image=gray)["image"], label)``.

    Args:
        root: the folder holding the four idx files (see the module docstring).
        name: ``mnist`` or ``fashion_mnist``.
        train: the 60000 training images, or the 10000 ``t10k`` test images.
        transform: an albumentations-style callable ``f(image=uint8 28x28) -> {"image": ...}``. None: the
            reference's pipeline of ``name`` (:func:`build_classification_transforms`; no augmentation).

    ``images`` is uint8 N x 28 x 28, ``targets`` a list of int, ``classes`` the class names. Labels come out
    as 0-d int64 tensors. Both files of the split are read and checked at construction.
    """

    def __init__(self, root: str | Path, name: str, train: bool,
                 transform: Callable[..., dict[str, Any]] | None = None):
        check_dataset_name(name, MNIST_NAMES)
        self.root, self.name, self.train = Path(root), name, train
        layout = LAYOUTS[name]
        image_name, label_name = FILES["train" if train else "test"]
        image_path = find_file(self.root, image_name, name)
        label_path = find_file(self.root, label_name, name)
        self.images = read_images(image_path, layout.title)
        labels = read_labels(label_path, layout.title)
        if len(labels) != len(self.images):
            raise DatasetError(f"{layout.title} files {image_path} and {label_path} do not match: {len(self.images)} "
                               f"images but {len(labels)} labels; expected one label per image")
        if len(labels) == 0:
            raise DatasetError(f"{layout.title} file {image_path} holds no images")
        self.targets: list[int] = labels.tolist()
        self.classes = list(layout.classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform if transform is not None else build_classification_transforms(name, train=False)

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES
