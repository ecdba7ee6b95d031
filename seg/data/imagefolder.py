"""Image classification from class folders (the ImageNet ``train/`` + ``val/`` layout)::

    <root>/train/<class>/<image>      e.g. train/n01440764/n01440764_10026.JPEG
    <root>/val/<class>/<image>

Class indices follow the sorted names of the class folders of ``train/`` (torchvision's ``ImageFolder``
order), and ``val/`` must hold the same classes, so an index means the same class in both splits. Images are
the files with an image suffix (:data:`seg.media.IMAGE_EXTS`, any case) anywhere below a class folder; hidden
files and folders are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from seg.data.cityscapes import DatasetError
from seg.media import IMAGE_EXTS, MediaError, read_image_rgb

SPLITS = ("train", "val")

LAYOUT_HELP = """expected class folders:
  {root}/train/<class>/<image>  and  {root}/val/<class>/<image>  (the same <class> names in both)
For ImageNet (ILSVRC2012, https://image-net.org/download.php), extract the train archive and its per-class
tar files into train/, and sort the flat val/ images into class folders (e.g. with the widely used
valprep.sh script)."""


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _images_below(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder`` (sorted, hidden entries skipped; symlinked folders followed)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        found += [
            Path(dirpath) / f
            for f in sorted(filenames)
            if not _hidden(f) and os.path.splitext(f)[1].lower() in IMAGE_EXTS
        ]
    return found


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the (non-hidden) sub-folders of ``split_dir``; none raises :class:`DatasetError`."""
    if not split_dir.is_dir():
        raise DatasetError(f"split folder {split_dir} does not exist; " + LAYOUT_HELP.format(root=split_dir.parent))
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not _hidden(p.name))
    if not names:
        loose = [p for p in split_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
        hint = (
            f" It holds {len(loose)} images directly: they must be sorted into one folder per class." if loose else ""
        )
        raise DatasetError(
            f"split folder {split_dir} has no class folders.{hint} " + LAYOUT_HELP.format(root=split_dir.parent)
        )
    return names


def _describe_difference(expected: Sequence[str], found: Sequence[str], limit: int = 5) -> str:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))

    def show(names: list[str]) -> str:
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return ", ".join(names[:limit]) + more

    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {show(missing)}")
    if extra:
        parts.append(f"not in train: {show(extra)}")
    return "; ".join(parts)


class ImageFolderDataset(Dataset):
    """Images in ``root/<split>/<class>/``; items are ``(transform(image=rgb)["image"], label)``.

    Args:
        root: folder holding ``train/`` and ``val/``.
        split: ``train`` or ``val``.
        transform: an albumentations-style callable ``f(image=rgb_uint8_hwc) -> {"image": ...}``, e.g.
            ``build_classification_transforms("imagenet", train)``. None returns the RGB uint8 HxWx3 array.
        classes: the class names in index order (e.g. from a checkpoint). None: the sorted class folders of
            ``root/train``. The split's class folders must be exactly these.

    ``samples`` lists ``(path, label)``, ``targets`` the labels, ``classes`` / ``class_to_idx`` the classes.
    Labels come out as 0-d int64 tensors. The folders are scanned at construction; images are read on use.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[..., dict[str, Any]] | None = None,
        classes: Sequence[str] | None = None,
    ):
        self.root = Path(root)
        if split not in SPLITS:
            raise DatasetError(f"image-folder split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.split = split
        self.transform = transform
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise DatasetError(f"image-folder root {self.root} {what}; " + LAYOUT_HELP.format(root=self.root))
        split_dir = self.root / split
        found = class_folders(split_dir)
        if classes is None:
            classes = found if split == "train" else class_folders(self.root / "train")
            source = f"the class folders of {self.root / 'train'}"
        else:
            classes = list(classes)
            source = "the given classes"
        if list(classes) != found:
            raise DatasetError(
                f"class folders of {split_dir} differ from {source} ({_describe_difference(classes, found)}); "
                f"every split needs the same class folders so that a label means the same class"
            )
        self.classes: list[str] = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for index, name in enumerate(self.classes):
            images = _images_below(split_dir / name)
            if not images:
                raise DatasetError(
                    f"class folder {split_dir / name} holds no images (expected files ending in "
                    f"{', '.join(IMAGE_EXTS)})"
                )
            self.samples += [(p, index) for p in images]
        self.targets = [label for _, label in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """The raw pair: RGB uint8 HxWx3 image and its label; an unreadable image raises DatasetError."""
        path, label = self.samples[index]
        try:
            return read_image_rgb(path), label
        except MediaError as e:  # in a dataset, an unreadable image is a dataset problem
            raise DatasetError(str(e)) from None

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        image, label = self.load(index)
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return image, torch.tensor(label, dtype=torch.int64)
