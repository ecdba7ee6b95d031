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
