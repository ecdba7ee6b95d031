"""CityscapesDataset on the synthetic set: loading, label fallbacks, the test split, and every error."""

import shutil

import cv2
import numpy as np
import pytest
import torch

from seg.data import CityscapesDataset, DatasetError, build_transforms, prepare_train_ids
from seg.data.labels import label_to_train


@pytest.fixture
def copy_root(synthetic_root, tmp_path):
    """A private, writable copy of the synthetic set (without the video)."""
    dst = tmp_path / "cs"
    shutil.copytree(synthetic_root, dst, ignore=shutil.ignore_patterns("*.mp4"))
    return dst


def test_items_are_rgb_images_and_train_id_masks(synthetic_root, tiny_data_cfg):
    ds = CityscapesDataset(synthetic_root, "train")
    assert len(ds) == 4 and all(
        lab is not None and lab.name.endswith("_labelTrainIds.png") for _, lab in ds.files
    )
    image, mask = ds[0]
    bgr = cv2.imread(str(ds.files[0][0]))
    assert np.array_equal(image, bgr[..., ::-1]) and mask.dtype == np.int64
    assert np.array_equal(mask, cv2.imread(str(ds.files[0][1]), cv2.IMREAD_UNCHANGED))
    assert set(np.unique(mask)) <= set(range(19)) | {255}
    train = CityscapesDataset(synthetic_root, "train", build_transforms(tiny_data_cfg, train=True, seed=0))
    img_t, mask_t = train[1]
    assert img_t.shape == (3, 32, 64) and img_t.dtype == torch.float32 and mask_t.dtype == torch.int64
    val = CityscapesDataset(synthetic_root, "val", build_transforms(tiny_data_cfg, train=False))
    img_v, mask_v = val[0]
    assert img_v.shape == (3, 64, 128) and mask_v.shape == (64, 128) and mask_v.dtype == torch.int64


def test_label_ids_are_used_through_the_lookup_when_train_ids_are_missing(copy_root):
    before = CityscapesDataset(copy_root, "val")
    expected = [before[i][1] for i in range(len(before))]
    for f in (copy_root / "gtFine" / "val").rglob("*_labelTrainIds.png"):
        f.unlink()
    after = CityscapesDataset(copy_root, "val")
    assert all(lab.name.endswith("_gtFine_labelIds.png") for _, lab in after.files)
    for i, exp in enumerate(expected):
        raw = cv2.imread(str(after.files[i][1]), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(after[i][1], exp) and np.array_equal(exp, label_to_train(raw))


def test_test_split_has_no_labels_and_ignore_masks(synthetic_root):
    ds = CityscapesDataset(synthetic_root, "test")
    assert len(ds) == 1 and ds.files[0][1] is None
    image, mask = ds[0]
    assert mask.shape == image.shape[:2] and (mask == 255).all()


def test_missing_root_explains_layout_and_where_to_get_cityscapes(tmp_path):
    with pytest.raises(DatasetError) as e:
        CityscapesDataset(tmp_path / "nowhere", "train")
    msg = str(e.value)
    for part in (
        str(tmp_path / "nowhere"),
        "does not exist",
        "leftImg8bit/",
        "cityscapes-dataset.com",
        "csDownload",
        "make demo",
        "prepare_cityscapes.py",
    ):
        assert part in msg


def test_empty_split_names_the_folder(synthetic_root):
    with pytest.raises(DatasetError, match=r"split 'extra' is empty: .*leftImg8bit/extra"):
        CityscapesDataset(synthetic_root, "extra")


def test_image_without_label_names_both_candidates_and_the_fix(copy_root):
    victim = sorted((copy_root / "gtFine" / "train").rglob("*_labelIds.png"))[0]
    stem = victim.name[: -len("_gtFine_labelIds.png")]
    for f in victim.parent.glob(f"{stem}_gtFine_label*Ids.png"):
        f.unlink()
    with pytest.raises(
        DatasetError,
        match=rf"{stem}_leftImg8bit.png has no label: .*labelTrainIds.png.*"
        r"labelIds.png.*prepare_cityscapes.py",
    ):
        CityscapesDataset(copy_root, "train")


def test_size_mismatch_names_both_files(copy_root):
    ds = CityscapesDataset(copy_root, "val")
    label = ds.files[0][1]
    cv2.imwrite(str(label), np.zeros((32, 64), np.uint8))
    with pytest.raises(
        DatasetError, match=r"size mismatch: image .*_leftImg8bit.png is 128x64 but label .* is 64x32"
    ):
        ds[0]


def test_truncated_or_garbage_files_are_reported(copy_root):
    ds = CityscapesDataset(copy_root, "val")
    image, label = ds.files[0]
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 3])
    with pytest.raises(DatasetError, match=rf"cannot read image {image}"):
        ds[0]
    label2 = ds.files[1][1]
    label2.write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=rf"cannot read label {label2}"):
        ds[1]


def test_train_id_file_with_foreign_values_is_rejected(copy_root):
    ds = CityscapesDataset(copy_root, "val")
    label = ds.files[0][1]
    cv2.imwrite(str(label), np.full((64, 128), 26, np.uint8))  # a labelId written where trainIds belong
    with pytest.raises(DatasetError, match=r"holds value 26, not a trainId"):
        ds[0]


def test_prepare_regenerates_train_ids_from_polygons_and_skips_done_files(copy_root):
    originals = {p: p.read_bytes() for p in (copy_root / "gtFine").rglob("*_labelTrainIds.png")}
    assert len(originals) == 6
    for p in originals:
        p.unlink()
    assert prepare_train_ids(copy_root, nproc=2) == (6, 0)
    for p, data in originals.items():
        assert np.array_equal(
            cv2.imread(str(p), cv2.IMREAD_UNCHANGED),
            cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED),
        )
    assert prepare_train_ids(copy_root, nproc=1) == (0, 6)
    assert not list((copy_root / "gtFine").rglob("*.tmp.png"))
    with pytest.raises(DatasetError, match="no gtFine/ folder"):
        prepare_train_ids(copy_root / "missing")


def test_reference_label_mapping_gives_the_paper_ids_and_pads_with_255(synthetic_root):
    plain = CityscapesDataset(synthetic_root, "val")
    ref = CityscapesDataset(synthetic_root, "val", label_mapping="reference")
    for i in range(len(plain)):
        train_ids, reference = plain[i][1], ref[i][1]
        assert np.array_equal(reference, np.where(train_ids == 255, 0, train_ids + 1))
    assert (ref[0][1] == 0).any()  # void is a label here, not ignored
    unlabeled = CityscapesDataset(synthetic_root, "test", label_mapping="reference")
    assert (unlabeled[0][1] == 255).all()  # no labels: still ignored, not void
    with pytest.raises(ValueError, match="label_mapping"):
        CityscapesDataset(synthetic_root, "val", label_mapping="labelIds")
