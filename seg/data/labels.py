"""Cityscapes label semantics: the one place that knows labelIds, trainIds, class names and colours.

Everything is derived from ``cityscapesscripts.helpers.labels`` so it cannot drift from the benchmark.
labelIds are the ids stored in ``*_gtFine_labelIds.png`` (0..33, -1 = license plate); trainIds are the
19 evaluated classes 0..18 with 255 = ignore.
"""

from __future__ import annotations

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CS_LABELS

IGNORE_INDEX = 255

# The evaluated classes in trainId order (trainIds 0..18 are each claimed by exactly one label).
_EVAL = sorted((lab for lab in _CS_LABELS if 0 <= lab.trainId < IGNORE_INDEX), key=lambda lab: lab.trainId)
assert [lab.trainId for lab in _EVAL] == list(range(len(_EVAL))), "cityscapesscripts trainIds are not 0..N-1"

NUM_CLASSES: int = len(_EVAL)
CLASS_NAMES: tuple[str, ...] = tuple(lab.name for lab in _EVAL)
PALETTE: np.ndarray = np.array([lab.color for lab in _EVAL], dtype=np.uint8)  # [19, 3] RGB, trainId order
PALETTE.flags.writeable = False

# labelId -> trainId for every possible uint8 value; ids cityscapesscripts does not define, and labels
# whose trainId is 255 or -1 (license plate), are ignored.
LABEL_TO_TRAIN_LUT: np.ndarray = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _lab in _CS_LABELS:
    if 0 <= _lab.id < 256 and 0 <= _lab.trainId < IGNORE_INDEX:
        LABEL_TO_TRAIN_LUT[_lab.id] = _lab.trainId
LABEL_TO_TRAIN_LUT.flags.writeable = False

# trainId -> labelId (for exporting predictions in the official format); ignore goes to 'unlabeled'.
TRAIN_TO_LABEL_LUT: np.ndarray = np.zeros(256, dtype=np.uint8)
for _lab in _EVAL:
    TRAIN_TO_LABEL_LUT[_lab.trainId] = _lab.id
TRAIN_TO_LABEL_LUT[IGNORE_INDEX] = next(lab.id for lab in _CS_LABELS if lab.name == "unlabeled")
TRAIN_TO_LABEL_LUT.flags.writeable = False


def label_to_train(label_ids: np.ndarray) -> np.ndarray:
    """Map an array of Cityscapes labelIds to trainIds (uint8, 255 = ignore), any integer dtype."""
    label_ids = np.asarray(label_ids)
    if label_ids.dtype == np.uint8:
        return LABEL_TO_TRAIN_LUT[label_ids]
    if not np.issubdtype(label_ids.dtype, np.integer):
        raise TypeError(f"label_to_train expects an integer array, got dtype {label_ids.dtype}")
    out = np.full(label_ids.shape, IGNORE_INDEX, dtype=np.uint8)
    valid = (label_ids >= 0) & (label_ids < 256)  # -1 (license plate) and anything unknown stay ignored
    out[valid] = LABEL_TO_TRAIN_LUT[label_ids[valid]]
    return out


def train_to_label(train_ids: np.ndarray) -> np.ndarray:
    """Map trainIds (0..18, 255 = ignore) to labelIds (uint8); ignore becomes 'unlabeled' (0)."""
    train_ids = np.asarray(train_ids)
    if not np.issubdtype(train_ids.dtype, np.integer):
        raise TypeError(f"train_to_label expects an integer array, got dtype {train_ids.dtype}")
    bad = ((train_ids < 0) | (train_ids >= NUM_CLASSES)) & (train_ids != IGNORE_INDEX)
    if bad.any():
        raise ValueError(
            f"train_to_label: value {int(train_ids[bad].flat[0])} is not a trainId "
            f"(expected 0..{NUM_CLASSES - 1} or {IGNORE_INDEX})"
        )
    return TRAIN_TO_LABEL_LUT[train_ids.astype(np.int64)]


# name -> labelId for every Cityscapes label (void ones included), e.g. for drawing annotations by name.
LABEL_IDS: dict[str, int] = {lab.name: lab.id for lab in _CS_LABELS}


# --------------------------------------------------------------------------------------------
# The paper's code's labels (github.com/yechengxi/deconvolution, Segmentation/datasets/cityscapes.py,
# `full_classes` -> `new_classes`): 21 outputs, every void label id (trainId 255, and the license plate -1)
# becomes class 0 and is trained on and scored, the 19 evaluated classes become 1..19 in trainId order,
# and class 20 is never a label. This is NOT the benchmark's labelling; it exists to rerun the paper.

REFERENCE_NUM_CLASSES = 21
REFERENCE_VOID = 0
REFERENCE_CLASS_NAMES: tuple[str, ...] = ("void", *CLASS_NAMES, "unused")

# trainId (0..18, 255) -> reference id (1..19, 0); any other value is not a trainId and stays 255.
TRAIN_TO_REFERENCE_LUT: np.ndarray = np.full(256, IGNORE_INDEX, dtype=np.uint8)
TRAIN_TO_REFERENCE_LUT[:NUM_CLASSES] = np.arange(1, NUM_CLASSES + 1)
TRAIN_TO_REFERENCE_LUT[IGNORE_INDEX] = REFERENCE_VOID
TRAIN_TO_REFERENCE_LUT.flags.writeable = False


def train_to_reference(train_ids: np.ndarray) -> np.ndarray:
    """trainIds (0..18, 255 = void) -> the paper's code's ids (classes 1..19, void 0), uint8."""
    train_ids = np.asarray(train_ids)
    if not np.issubdtype(train_ids.dtype, np.integer):
        raise TypeError(f"train_to_reference expects an integer array, got dtype {train_ids.dtype}")
    bad = ((train_ids < 0) | (train_ids >= NUM_CLASSES)) & (train_ids != IGNORE_INDEX)
    if bad.any():
        raise ValueError(f"train_to_reference: value {int(train_ids[bad].flat[0])} is not a trainId "
                         f"(expected 0..{NUM_CLASSES - 1} or {IGNORE_INDEX})")
    return TRAIN_TO_REFERENCE_LUT[train_ids.astype(np.int64)]


def label_to_reference(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes labelIds (-1..33) -> the paper's code's ids: the reference's ``new_classes``."""
    return train_to_reference(label_to_train(label_ids))


def reference_to_train(reference_ids: np.ndarray) -> np.ndarray:
    """The paper's code's ids -> trainIds: 1..19 -> 0..18; void (0), the unused 20 and padding (255) -> 255."""
    ids = np.asarray(reference_ids).astype(np.int64)
    out = np.full(ids.shape, IGNORE_INDEX, dtype=np.uint8)
    cls = (ids >= 1) & (ids <= NUM_CLASSES)
    out[cls] = ids[cls] - 1
    return out
