"""ImageFolderDataset on a tiny class-folder tree written here, its errors, and the ImageNet transforms."""

import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from seg.data.cityscapes import DatasetError
from seg.data.classification_transforms import IMAGENET_MEAN, IMAGENET_STD, build_classification_transforms
from seg.data.imagefolder import ImageFolderDataset

CLASSES = ["cat", "dog", "fish"]  # sorted


def write(path: Path, h: int, w: int, value: int) -> np.ndarray:
    """Write an RGB image (BGR on disk via cv2) whose pixels encode ``value``; return the RGB array."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([np.full((h, w), value), yy % 256, xx % 256], -1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return rgb


@pytest.fixture
def tree(tmp_path) -> Path:
    for k, name in enumerate(CLASSES):
        write(tmp_path / "train" / name / "a.png", 40, 60, 10 * k)
        write(tmp_path / "train" / name / "b.PNG", 50, 30, 10 * k + 1)
        write(tmp_path / "val" / name / "v.png", 36, 36, 10 * k + 2)
    write(tmp_path / "train" / "dog" / "sub" / "c.jpg", 20, 20, 99)  # nested images count too
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "cat" / ".hidden.png").write_bytes(b"skipped")
    (tmp_path / "train" / ".cache").mkdir()  # a hidden folder is no class
    return tmp_path


def test_classes_labels_and_samples(tree):
    train = ImageFolderDataset(tree, "train")
    val = ImageFolderDataset(tree, "val")
    assert train.classes == CLASSES == val.classes and train.num_classes == 3
    assert train.class_to_idx == {"cat": 0, "dog": 1, "fish": 2}
    names = [p.relative_to(tree / "train").as_posix() for p, _ in train.samples]
    assert names == ["cat/a.png", "cat/b.PNG", "dog/a.png", "dog/b.PNG", "dog/sub/c.jpg", "fish/a.png", "fish/b.PNG"]
    assert train.targets == [0, 0, 1, 1, 1, 2, 2] and val.targets == [0, 1, 2]
    image, label = train[5]  # fish/a.png, no transform: the RGB array as written
    assert isinstance(image, np.ndarray) and image.shape == (40, 60, 3) and image.dtype == np.uint8
    assert (image[..., 0] == 20).all() and image[7, 9, 1] == 7 and image[7, 9, 2] == 9
    assert label.dtype == torch.int64 and label.ndim == 0 and int(label) == 2


def test_with_imagenet_transforms(tree):
    train = ImageFolderDataset(tree, "train", build_classification_transforms("imagenet", train=True, seed=0))
    val = ImageFolderDataset(tree, "val", build_classification_transforms("imagenet", train=False))
    for ds in (train, val):
        image, label = ds[1]
        assert image.dtype == torch.float32 and tuple(image.shape) == (3, 224, 224)
        images, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
        assert tuple(images.shape) == (3, 3, 224, 224) and labels.tolist() == ds.targets[:3]


def test_explicit_classes_must_match_the_split(tree):
    assert ImageFolderDataset(tree, "val", classes=CLASSES).classes == CLASSES
    with pytest.raises(DatasetError, match="missing 1: bird") as e:
        ImageFolderDataset(tree, "val", classes=["bird", *CLASSES])
    assert str(tree / "val") in str(e.value)


# --------------------------------------------------------------------------------------------
# errors


def test_missing_root_and_split(tmp_path, tree):
    with pytest.raises(DatasetError, match="does not exist") as e:
        ImageFolderDataset(tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere") in str(e.value) and "<class>" in str(e.value)
    (tree / "val").rename(tree / "validation")
    with pytest.raises(DatasetError, match="split folder .* does not exist") as e:
        ImageFolderDataset(tree, "val")
    assert str(tree / "val") in str(e.value)
    with pytest.raises(DatasetError, match="train or val|train, val"):
        ImageFolderDataset(tree, "test")


def test_val_classes_must_equal_train_classes(tree):
    (tree / "val" / "fish" / "v.png").rename(tree / "val" / "dog" / "v2.png")
    (tree / "val" / "fish").rmdir()
    write(tree / "val" / "zebra" / "z.png", 8, 8, 0)
    with pytest.raises(DatasetError) as e:
        ImageFolderDataset(tree, "val")
    msg = str(e.value)
    assert str(tree / "val") in msg and str(tree / "train") in msg
    assert "missing 1: fish" in msg and "not in train: zebra" in msg


def test_val_needs_the_train_folder_for_its_class_order(tree):
    (tree / "train").rename(tree / "elsewhere")
    with pytest.raises(DatasetError, match="split folder .*train does not exist"):
        ImageFolderDataset(tree, "val")


def test_empty_class_folder_is_named(tree):
    (tree / "train" / "emu").mkdir()
    (tree / "train" / "emu" / "readme.txt").write_text("no images here")
    write(tree / "val" / "emu" / "e.png", 8, 8, 0)
    with pytest.raises(DatasetError, match="holds no images") as e:
        ImageFolderDataset(tree, "train")
    assert str(tree / "train" / "emu") in str(e.value)


def test_flat_val_folder_gets_a_hint(tree, tmp_path):
    flat = tmp_path / "flat"
    write(flat / "train" / "cat" / "a.png", 8, 8, 0)
    write(flat / "val" / "ILSVRC2012_val_00000001.JPEG", 8, 8, 0)
    with pytest.raises(DatasetError, match="holds 1 images directly: they must be sorted into one folder per class"):
        ImageFolderDataset(flat, "val")


def test_unreadable_image_is_named_when_loaded(tree):
    bad = tree / "train" / "cat" / "broken.png"
    bad.write_bytes(b"not a png")
    ds = ImageFolderDataset(tree, "train")
    index = [p for p, _ in ds.samples].index(bad)
    with pytest.raises(DatasetError) as e:
        ds[index]
    assert str(bad) in str(e.value)


# --------------------------------------------------------------------------------------------
# ImageNet transforms


def denormalise(t: torch.Tensor) -> np.ndarray:
    return (t.numpy().transpose(1, 2, 0) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)) * 255.0


def test_imagenet_val_is_short_side_256_then_centre_224():
    rgb = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    out = build_classification_transforms("imagenet", train=False)(image=rgb)["image"]
    assert tuple(out.shape) == (3, 224, 224)
    resized = cv2.resize(rgb, (341, 256), interpolation=cv2.INTER_AREA)  # 400 * 256 / 300 = 341.3
    top, left = (256 - 224) // 2, (341 - 224) // 2
    expected = resized[top : top + 224, left : left + 224].astype(np.float64)
    assert np.abs(denormalise(out) - expected).max() < 0.01
    # normalisation with the reference's ImageNet numbers
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    v = expected[0, 0, 1] / 255.0
    assert np.isclose(out[1, 0, 0].item(), (v - 0.456) / 0.224, atol=1e-5)


def test_imagenet_train_crops_rescale_flip_and_repeat_per_seed():
    # left half dark, right half bright: a crop's mean brightness and flip are visible in the output
    rgb = np.zeros((240, 320, 3), np.uint8)
    rgb[:, 160:] = 255
    tf = build_classification_transforms("imagenet", train=True)

    def draws(seed: int) -> list[torch.Tensor]:
        tf.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return [tf(image=rgb)["image"] for _ in range(24)]

    a, b = draws(1), draws(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, draws(2)))
    assert all(tuple(x.shape) == (3, 224, 224) for x in a)
    means = {round(float(denormalise(x).mean()), 1) for x in a}
    assert len(means) > 5, "crops differ in where they sample the image"
    # both orientations occur: bright on the right (as given) and on the left (flipped)
    contrast = [denormalise(x)[:, -1].mean() - denormalise(x)[:, 0].mean() for x in a]
    sides = {bool(c > 0) for c in contrast if abs(c) > 100}  # crops that span the edge
    assert sides == {True, False}
