"""Label semantics against cityscapesscripts' own table."""

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import id2label, labels, trainId2label

from seg.data import labels as L


def test_every_label_id_maps_to_the_cityscapesscripts_train_id():
    for lab in labels:
        expected = lab.trainId if 0 <= lab.trainId < 255 else 255
        got = L.label_to_train(np.array([lab.id], dtype=np.int64))[0]
        assert got == expected, lab
        if lab.id >= 0:
            assert L.label_to_train(np.array([lab.id], dtype=np.uint8))[0] == expected, lab
    # ids cityscapesscripts does not define are ignored, through both code paths
    undefined = np.array([i for i in range(256) if i not in id2label])
    assert (L.label_to_train(undefined.astype(np.uint8)) == 255).all()
    assert (L.label_to_train(undefined.astype(np.int32)) == 255).all()
    assert L.label_to_train(np.array([-1, 300])).tolist() == [255, 255]


def test_export_maps_train_ids_back_to_label_ids():
    train_ids = np.arange(L.NUM_CLASSES, dtype=np.uint8)
    back = L.train_to_label(train_ids)
    for t, lid in zip(train_ids, back, strict=True):
        assert trainId2label[int(t)].id == lid
        assert id2label[int(lid)].trainId == t
    assert L.train_to_label(np.array([255]))[0] == id2label[0].id == 0  # ignore -> 'unlabeled'
    round_trip = L.label_to_train(L.train_to_label(np.array([[0, 18], [255, 7]])))
    assert round_trip.tolist() == [[0, 18], [255, 7]]
    with pytest.raises(ValueError, match="19 is not a trainId"):
        L.train_to_label(np.array([19]))


def test_names_and_palette_follow_train_id_order():
    assert L.NUM_CLASSES == 19 and L.IGNORE_INDEX == 255
    assert L.CLASS_NAMES == tuple(trainId2label[i].name for i in range(19))
    assert L.PALETTE.shape == (19, 3) and L.PALETTE.dtype == np.uint8
    assert [tuple(c) for c in L.PALETTE] == [trainId2label[i].color for i in range(19)]
    assert L.LABEL_IDS["car"] == 26 and L.LABEL_IDS["license plate"] == -1


# The paper's code (Segmentation/datasets/cityscapes.py): label ids `full_classes` remapped to `new_classes`.
REFERENCE_FULL_CLASSES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                          17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, -1)
REFERENCE_NEW_CLASSES = (0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 3, 4, 5, 0, 0, 0, 6, 0, 7,
                         8, 9, 10, 11, 12, 13, 14, 15, 16, 0, 0, 17, 18, 19, 0)


def test_reference_mapping_equals_the_paper_code_for_every_label_id():
    ids = np.array(REFERENCE_FULL_CLASSES, dtype=np.int64)
    assert L.label_to_reference(ids).tolist() == list(REFERENCE_NEW_CLASSES)
    # through labelTrainIds files (what the dataset reads): void 255 -> 0, trainId t -> t + 1
    train_ids = L.label_to_train(ids)
    assert L.train_to_reference(train_ids).tolist() == list(REFERENCE_NEW_CLASSES)
    assert L.REFERENCE_NUM_CLASSES == 21 == max(REFERENCE_NEW_CLASSES) + 2  # 20 never a label
    assert L.REFERENCE_CLASS_NAMES[1:20] == L.CLASS_NAMES and L.REFERENCE_CLASS_NAMES[0] == "void"
    # back to trainIds for drawing and export: void and the unused 20 are ignore, so is padding
    back = L.reference_to_train(np.array([0, 1, 19, 20, 255]))
    assert back.tolist() == [255, 0, 18, 255, 255]
    with pytest.raises(ValueError, match="19 is not a trainId"):
        L.train_to_reference(np.array([19]))
