"""The Cityscapes dataset in its official folder layout (also used by the synthetic set).

``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` pairs with ``gtFine/<split>/<city>/<name>_gtFine_
labelTrainIds.png`` (preferred) or ``..._gtFine_labelIds.png`` (mapped through :mod:`seg.data.labels`).
The ``test`` split has no public labels: its masks are all ignore.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from seg.data.labels import IGNORE_INDEX, NUM_CLASSES, label_to_train, train_to_reference
from seg.errors import UserError
from seg.media import MediaError, read_image_rgb, read_mask

IMAGE_SUFFIX = "_leftImg8bit.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
UNLABELED_SPLITS = ("test",)

LAYOUT_HELP = """expected the Cityscapes layout:
  {root}/leftImg8bit/{{train,val,test}}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  {root}/gtFine/{{train,val,test}}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png  (or _labelIds.png)
Get Cityscapes (free registration) from https://www.cityscapes-dataset.com/downloads/
(leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip), or with cityscapesscripts:
`csDownload leftImg8bit_trainvaltest.zip gtFine_trainvaltest.zip`; unzip both into the root and run
`python tools/prepare_cityscapes.py --root {root}` to write the labelTrainIds files.
No download is needed to try the project: `make demo` uses a generated synthetic set
(`python tools/make_synthetic_cityscapes.py --root datasets/synthetic_cityscapes`)."""


class DatasetError(UserError, RuntimeError):
    """The dataset on disk is missing, incomplete or unreadable; the message names the path."""


def read_label(path: str | Path) -> np.ndarray:
    """Read a single-channel 8-bit label PNG as uint8 HxW; anything else raises :class:`DatasetError`."""
    try:
        return read_mask(path, "label")
    except MediaError as e:
        raise DatasetError(str(e)) from None


class CityscapesDataset(Dataset):
    """Cityscapes fine annotations; items are ``transform(image=rgb, mask=trainIds)`` as (image, mask).

    Args:
        root: folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``train``, ``val``, ``test`` (or any folder name under ``leftImg8bit/``).
        transform: an albumentations-style callable ``f(image=..., mask=...) -> dict``; None returns numpy
            arrays (RGB uint8 HxWx3, int64 HxW).
        label_mapping: ``trainid`` (19 classes, 255 = ignore) or ``reference`` (the paper's code's ids: void
            0, classes 1..19; see :mod:`seg.data.labels`), applied before ``transform``, whose padding is 255.

    ``files`` lists ``(image_path, label_path_or_None)``; the mask is int64 with 255 = ignore.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[..., dict[str, Any]] | None = None,
        label_mapping: str = "trainid",
    ):
        if label_mapping not in ("trainid", "reference"):
            raise ValueError(f"label_mapping must be 'trainid' or 'reference', got {label_mapping!r}")
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.label_mapping = label_mapping
        if not (self.root / "leftImg8bit").is_dir():
            what = "does not exist" if not self.root.exists() else "has no leftImg8bit/ folder"
            raise DatasetError(f"Cityscapes root {self.root} {what}; " + LAYOUT_HELP.format(root=self.root))
        image_dir = self.root / "leftImg8bit" / split
        images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        if not images:
            raise DatasetError(
                f"split '{split}' is empty: no */*{IMAGE_SUFFIX} under {image_dir}; "
                + LAYOUT_HELP.format(root=self.root)
            )
        self.labeled = split not in UNLABELED_SPLITS
        self.files: list[tuple[Path, Path | None]] = [(img, self._label_for(img)) for img in images]

    def _label_for(self, image: Path) -> Path | None:
        if not self.labeled:
            return None
        stem = image.name[: -len(IMAGE_SUFFIX)]
        gt_dir = self.root / "gtFine" / self.split / image.parent.name
        for suffix in (TRAIN_IDS_SUFFIX, LABEL_IDS_SUFFIX):
            if (gt_dir / (stem + suffix)).is_file():
                return gt_dir / (stem + suffix)
        hint = ""
        if (gt_dir / (stem + "_gtFine_polygons.json")).is_file():
            hint = f" Only polygons exist: run `python tools/prepare_cityscapes.py --root {self.root}`."
        raise DatasetError(
            f"image {image} has no label: expected {gt_dir / (stem + TRAIN_IDS_SUFFIX)} "
            f"or {gt_dir / (stem + LABEL_IDS_SUFFIX)}.{hint}"
        )

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw pair: RGB uint8 HxWx3 image and uint8 HxW mask (trainIds, 255 = ignore, or the paper's ids)."""
        image_path, label_path = self.files[index]
        try:
            image = read_image_rgb(image_path)
        except MediaError as e:  # in a dataset, an unreadable image is a dataset problem
            raise DatasetError(str(e)) from None
        if label_path is None:
            return image, np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        label = read_label(label_path)
        if label.shape != image.shape[:2]:
            raise DatasetError(
                f"size mismatch: image {image_path} is {image.shape[1]}x{image.shape[0]} but label "
                f"{label_path} is {label.shape[1]}x{label.shape[0]} (width x height)"
            )
        if label_path.name.endswith(LABEL_IDS_SUFFIX):
            label = label_to_train(label)
        else:
            bad = (label >= NUM_CLASSES) & (label != IGNORE_INDEX)
            if bad.any():
                raise DatasetError(
                    f"label {label_path} holds value {int(label[bad][0])}, not a trainId "
                    f"(expected 0..{NUM_CLASSES - 1} or {IGNORE_INDEX})"
                )
        if self.label_mapping == "reference":
            label = train_to_reference(label)
        return image, label

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, mask = self.load(index)
        if self.transform is None:
            return image, mask.astype(np.int64)
        out = self.transform(image=image, mask=mask)
        image, mask = out["image"], out["mask"]
        mask = mask.long() if isinstance(mask, torch.Tensor) else np.asarray(mask, dtype=np.int64)
        return image, mask


# --------------------------------------------------------------------------------------------
# preparing real Cityscapes: *_gtFine_labelTrainIds.png from the polygon annotations

POLYGONS_SUFFIX = "_gtFine_polygons.json"


def _json_to_train_ids(json_path: Path) -> Path:
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    out = json_path.with_name(json_path.name[: -len(POLYGONS_SUFFIX)] + TRAIN_IDS_SUFFIX)
    tmp = out.with_name(out.name[: -len(".png")] + ".tmp.png")  # rename at the end: no half-written labels
    try:
        json2labelImg(str(json_path), str(tmp), "trainIds")
    except SystemExit as e:  # cityscapesscripts prints and exits on an unknown label
        raise DatasetError(f"cityscapesscripts could not convert {json_path} (unknown label?)") from e
    except Exception as e:
        raise DatasetError(f"cannot convert {json_path}: {e}") from e
    tmp.replace(out)
    return out


def prepare_train_ids(root: str | Path, nproc: int = 1, overwrite: bool = False) -> tuple[int, int]:
    """Write every missing ``*_gtFine_labelTrainIds.png`` under ``root/gtFine`` from its polygons JSON with
    cityscapesscripts' ``json2labelImg`` (encoding ``trainIds``). Returns (written, skipped)."""
    gt = Path(root) / "gtFine"
    if not gt.is_dir():
        raise DatasetError(f"no gtFine/ folder under {root}; " + LAYOUT_HELP.format(root=root))
    jsons = sorted(gt.glob(f"*/*/*{POLYGONS_SUFFIX}"))
    if not jsons:
        raise DatasetError(f"no */*/*{POLYGONS_SUFFIX} files under {gt}")
    todo = [
        j
        for j in jsons
        if overwrite or not j.with_name(j.name[: -len(POLYGONS_SUFFIX)] + TRAIN_IDS_SUFFIX).is_file()
    ]
    if todo:
        if nproc <= 1:
            for j in todo:
                _json_to_train_ids(j)
        else:
            import multiprocessing

            with multiprocessing.Pool(nproc) as pool:
                for _ in pool.imap_unordered(_json_to_train_ids, todo, chunksize=8):
                    pass
    return len(todo), len(jsons) - len(todo)
