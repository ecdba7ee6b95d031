"""CIFAR: the reader on the generated stand-in and on a CIFAR-100 archive written here (official layouts),
its error messages, the stand-in generator and tool, and the CIFAR transforms (geometry, numbers, seeding)."""

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from seg.data.cifar import CIFAR_URL, CifarDataset
from seg.data.cifar_standin import CLASS_NAMES, FOLDER, StandinError, generate_cifar10_standin
from seg.data.cityscapes import DatasetError
from seg.data.classification_transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    UnknownDatasetError,
    build_classification_transforms,
)
from seg.engine.sampling import SeededSamples
from seg.errors import UserError
from tools import make_cifar_standin as standin_tool

TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 2


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    return generate_cifar10_standin(tmp_path_factory.mktemp("standin"), TRAIN_PER_CLASS, TEST_PER_CLASS, seed=0)


def normalised(image: np.ndarray, mean, std) -> np.ndarray:
    """What ToTensor() + Normalize(mean, std) gives for an RGB uint8 HxWx3 image, as 3xHxW."""
    return ((image / 255.0 - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


def write_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def copy_standin(src: Path, dst: Path) -> Path:
    (dst / FOLDER).mkdir(parents=True)
    for f in (src / FOLDER).iterdir():
        (dst / FOLDER / f.name).write_bytes(f.read_bytes())
    return dst


# --------------------------------------------------------------------------------------------
# reading the stand-in through the real reader


def test_standin_reads_back_with_shapes_labels_and_class_names(standin):
    train = CifarDataset(standin, "cifar10", train=True)
    test = CifarDataset(standin, "cifar10", train=False)
    assert (len(train), len(test)) == (10 * TRAIN_PER_CLASS, 10 * TEST_PER_CLASS)
    assert train.classes == list(CLASS_NAMES) == test.classes and train.num_classes == 10
    assert train.images.shape == (30, 32, 32, 3) and train.images.dtype == np.uint8
    assert np.bincount(train.targets, minlength=10).tolist() == [TRAIN_PER_CLASS] * 10
    assert np.bincount(test.targets, minlength=10).tolist() == [TEST_PER_CLASS] * 10
    image, label = train[4]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, 32, 32)
    assert label.dtype == torch.int64 and label.ndim == 0 and int(label) == train.targets[4]
    # transform=None is the reference's test pipeline: normalise with the CIFAR-10 numbers only
    raw, _ = train.load(4)
    assert np.allclose(image.numpy(), normalised(raw, CIFAR10_MEAN, CIFAR10_STD), atol=1e-5)
    images, labels = next(iter(DataLoader(train, batch_size=8)))
    assert tuple(images.shape) == (8, 3, 32, 32) and labels.dtype == torch.int64 and tuple(labels.shape) == (8,)


def test_standin_files_have_the_official_keys_types_and_channel_order(standin):
    folder = standin / FOLDER
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    )
    total = 0
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        blob = (folder / name).read_bytes()
        assert blob[:2] == b"\x80\x02", "protocol 2, as the official files"
        d = pickle.loads(blob, encoding="bytes")
        assert set(d) == {b"batch_label", b"labels", b"data", b"filenames"}
        assert isinstance(d[b"batch_label"], bytes) and all(isinstance(f, bytes) for f in d[b"filenames"])
        assert type(d[b"labels"]) is list and all(type(x) is int for x in d[b"labels"])
        assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (len(d[b"labels"]), 3072)
        total += len(d[b"labels"]) if name != "test_batch" else 0
    assert total == 10 * TRAIN_PER_CLASS
    meta = pickle.loads((folder / "batches.meta").read_bytes(), encoding="bytes")
    assert meta[b"label_names"] == [n.encode() for n in CLASS_NAMES] and meta[b"num_vis"] == 3072
    # rows are channel-major (1024 R, 1024 G, 1024 B), each a row-major 32x32 plane
    d = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="bytes")
    image = CifarDataset(standin, "cifar10", train=True).images[0]
    for c in range(3):
        assert np.array_equal(image[..., c], d[b"data"][0, 1024 * c : 1024 * (c + 1)].reshape(32, 32))
    name = d[b"filenames"][0].decode()
    assert name.startswith(CLASS_NAMES[d[b"labels"][0]] + "_s_")


def test_standin_is_deterministic_per_seed(standin, tmp_path):
    again = generate_cifar10_standin(tmp_path / "again", TRAIN_PER_CLASS, TEST_PER_CLASS, seed=0)
    other = generate_cifar10_standin(tmp_path / "other", TRAIN_PER_CLASS, TEST_PER_CLASS, seed=1)
    for f in (standin / FOLDER).iterdir():
        assert (again / FOLDER / f.name).read_bytes() == f.read_bytes(), f.name
    assert (other / FOLDER / "test_batch").read_bytes() != (standin / FOLDER / "test_batch").read_bytes()
    # an image depends on (seed, split, index) only: more training images leave the test batch alone
    more = generate_cifar10_standin(tmp_path / "more", TRAIN_PER_CLASS + 2, TEST_PER_CLASS, seed=0)
    assert (more / FOLDER / "test_batch").read_bytes() == (standin / FOLDER / "test_batch").read_bytes()


def test_standin_images_vary_and_colour_does_not_give_the_class_away(tmp_path):
    ds = CifarDataset(generate_cifar10_standin(tmp_path, 20, 1, seed=3), "cifar10", train=True)
    images = ds.images.astype(np.float64)
    assert len({im.tobytes() for im in ds.images}) == len(ds)
    labels = np.array(ds.targets)
    # nearest class-mean colour classifies at about chance level (random colours per image)
    colours = images.mean(axis=(1, 2))
    centres = np.stack([colours[labels == c].mean(0) for c in range(10)])
    guess = np.argmin(((colours[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert (guess == labels).mean() < 0.35
    assert images.std(axis=(1, 2)).mean() > 10  # not flat images


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(train_per_class=0, test_per_class=1, seed=0), "train_per_class"),
        (dict(train_per_class=1, test_per_class=1001, seed=0), "test_per_class"),
        (dict(train_per_class=1, test_per_class=1, seed=-1), "seed"),
    ],
)
def test_standin_rejects_bad_counts(tmp_path, kwargs, needle):
    with pytest.raises(StandinError, match=needle):
        generate_cifar10_standin(tmp_path, **kwargs)


def test_tool_writes_a_readable_set_and_reports_errors_in_one_line(tmp_path, capsys):
    assert standin_tool.main(["--root", str(tmp_path / "s"), "--train-per-class", "1", "--test-per-class", "1"]) == 0
    assert len(CifarDataset(tmp_path / "s", "cifar10", train=True)) == 10
    capsys.readouterr()
    assert standin_tool.main(["--root", str(tmp_path / "s"), "--train-per-class", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "train_per_class" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "file").write_text("x")
    assert standin_tool.main(["--root", str(tmp_path / "file"), "--train-per-class", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(tmp_path / "file") in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# CIFAR-100, written here in the official layout


def fine_names() -> list[bytes]:
    return [f"class_{i:02d}".encode() for i in range(100)]


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("official100")
    rng = np.random.default_rng(0)
    batches = {}
    for split, n in (("train", 7), ("test", 4)):
        fine = [int(x) for x in rng.integers(0, 100, n)]
        fine[0] = 99
        batches[split] = {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [f // 5 for f in fine],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        write_pickle(root / "cifar-100-python" / split, batches[split])
    meta = {b"fine_label_names": fine_names(), b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]}
    write_pickle(root / "cifar-100-python" / "meta", meta)
    return root, batches


def test_cifar100_fine_labels_names_pixels_and_normalisation(cifar100):
    root, batches = cifar100
    train = CifarDataset(root, "cifar100", train=True)
    test = CifarDataset(root, "cifar100", train=False)
    assert (len(train), len(test), train.num_classes) == (7, 4, 100)
    assert train.classes == [n.decode() for n in fine_names()]
    assert train.targets == batches["train"][b"fine_labels"] and test.targets == batches["test"][b"fine_labels"]
    row = batches["test"][b"data"][2]
    expected = row.reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(test.load(2)[0], expected)
    image, label = test[2]
    assert int(label) == batches["test"][b"fine_labels"][2]
    assert np.allclose(image.numpy(), normalised(expected, CIFAR100_MEAN, CIFAR100_STD), atol=1e-5)


def test_a_file_repickled_with_str_keys_is_read_too(cifar100, tmp_path):
    root, batches = cifar100
    for name in ("train", "test", "meta"):
        d = pickle.loads((root / "cifar-100-python" / name).read_bytes(), encoding="bytes")
        write_pickle(tmp_path / "cifar-100-python" / name, {k.decode(): v for k, v in d.items()})
    assert CifarDataset(tmp_path, "cifar100", train=True).targets == batches["train"][b"fine_labels"]


# --------------------------------------------------------------------------------------------
# errors name the path and say where the files go


def test_missing_root_says_where_the_files_go_and_where_to_get_them(tmp_path):
    with pytest.raises(DatasetError) as e:
        CifarDataset(tmp_path / "nowhere", "cifar10", train=True)
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "cifar-10-batches-py" in msg and CIFAR_URL in msg
    assert "python version" in msg and "make_cifar_standin" in msg
    assert isinstance(e.value, UserError)
    with pytest.raises(DatasetError, match="cifar-100-python.tar.gz"):
        CifarDataset(tmp_path, "cifar100", train=False)


def test_missing_folder_hints(standin, tmp_path):
    with pytest.raises(DatasetError, match="root should be the folder that contains"):
        CifarDataset(standin / FOLDER, "cifar10", train=True)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DatasetError, match="not extracted"):
        CifarDataset(tmp_path, "cifar10", train=True)
    (tmp_path / "cifar-10-batches-bin").mkdir()
    (tmp_path / "cifar-10-python.tar.gz").unlink()
    with pytest.raises(DatasetError, match="binary/MATLAB version"):
        CifarDataset(tmp_path, "cifar10", train=True)


def test_missing_batch_file_is_named(standin, tmp_path):
    root = copy_standin(standin, tmp_path)
    (root / FOLDER / "data_batch_3").unlink()
    with pytest.raises(DatasetError) as e:
        CifarDataset(root, "cifar10", train=True)
    assert str(root / FOLDER / "data_batch_3") in str(e.value) and CIFAR_URL in str(e.value)
    assert len(CifarDataset(root, "cifar10", train=False)) == 20  # the test split does not need it


def test_truncated_archive_is_reported_as_damaged(standin, tmp_path):
    root = copy_standin(standin, tmp_path)
    path = root / FOLDER / "data_batch_2"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DatasetError, match="damaged") as e:
        CifarDataset(root, "cifar10", train=True)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "batch, needle",
    [
        ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]}, "expected b'data' and b'labels'"),
        ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, "uint8 N x 3072"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8 N x 3072"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "label 10 outside 0..9"),
        ([1, 2, 3], "holds a list"),
    ],
)
def test_wrong_content_is_named(standin, tmp_path, batch, needle):
    root = copy_standin(standin, tmp_path)
    write_pickle(root / FOLDER / "test_batch", batch)
    with pytest.raises(DatasetError, match=needle) as e:
        CifarDataset(root, "cifar10", train=False)
    assert str(root / FOLDER / "test_batch") in str(e.value)


def test_meta_with_wrong_class_count_is_named(standin, tmp_path):
    root = copy_standin(standin, tmp_path)
    write_pickle(root / FOLDER / "batches.meta", {b"label_names": [b"a", b"b"]})
    with pytest.raises(DatasetError, match="2 names; expected 10") as e:
        CifarDataset(root, "cifar10", train=False)
    assert str(root / FOLDER / "batches.meta") in str(e.value)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_that_would_run_code_is_refused(standin, tmp_path, capsys):
    root = copy_standin(standin, tmp_path)
    write_pickle(root / FOLDER / "test_batch", {b"data": _RunsCode(), b"labels": []})
    with pytest.raises(DatasetError, match=r"refers to .*print"):
        CifarDataset(root, "cifar10", train=False)
    assert "must never run" not in capsys.readouterr().out


def test_unknown_name_is_a_user_error(standin):
    with pytest.raises(UnknownDatasetError, match="cifar10, cifar100"):
        CifarDataset(standin, "cifar1000", train=True)
    with pytest.raises(UnknownDatasetError, match="imagenet"):
        build_classification_transforms("svhn", train=True)  # the reference has it; we do not


# --------------------------------------------------------------------------------------------
# transforms


def coordinate_image() -> np.ndarray:
    """R encodes the row, G the column (both 4 + 8 * index), B is 200: every pixel is unique, padding is 0."""
    yy, xx = np.mgrid[0:32, 0:32]
    return np.stack([4 + 8 * yy, 4 + 8 * xx, np.full_like(yy, 200)], -1).astype(np.uint8)


def denormalise(t: torch.Tensor, mean, std) -> np.ndarray:
    return np.rint((t.numpy().transpose(1, 2, 0) * np.array(std) + np.array(mean)) * 255.0)


def test_reference_numbers():
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465) and CIFAR10_STD == (0.2023, 0.1994, 0.2010)
    assert CIFAR100_MEAN == (0.5071, 0.4865, 0.4409) and CIFAR100_STD == (0.2009, 0.1984, 0.2023)


@pytest.mark.parametrize(
    "name, mean, std", [("cifar10", CIFAR10_MEAN, CIFAR10_STD), ("cifar100", CIFAR100_MEAN, CIFAR100_STD)]
)
def test_test_pipeline_only_normalises(name, mean, std):
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = build_classification_transforms(name, train=False)(image=image)["image"]
    assert out.dtype == torch.float32 and tuple(out.shape) == (3, 32, 32)
    assert np.allclose(out.numpy(), normalised(image, mean, std), atol=1e-5)
    assert np.isclose(out[0, 0, 0].item(), (image[0, 0, 0] / 255.0 - mean[0]) / std[0], atol=1e-5)


def test_train_pipeline_is_a_padded_random_crop_with_flip():
    image = coordinate_image()
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    candidates = {}
    for dy in range(9):
        for dx in range(9):
            crop = padded[dy : dy + 32, dx : dx + 32]
            candidates[crop.tobytes()] = (dy, dx, False)
            candidates[crop[:, ::-1].tobytes()] = (dy, dx, True)
    tf = build_classification_transforms("cifar10", train=True, seed=0)
    seen = []
    for _ in range(1500):
        out = tf(image=image)["image"]
        assert tuple(out.shape) == (3, 32, 32)
        pixels = denormalise(out, CIFAR10_MEAN, CIFAR10_STD).astype(np.uint8)
        assert pixels.tobytes() in candidates, "not a zero-padded 32x32 crop (optionally flipped) of the input"
        seen.append(candidates[pixels.tobytes()])
    offsets = {(dy, dx) for dy, dx, _ in seen}
    assert len(offsets) == 81, "every offset 0..8 x 0..8 occurs"
    flips = np.mean([f for *_, f in seen])
    assert 0.42 < flips < 0.58


def test_set_random_state_makes_augmentation_repeatable():
    image = coordinate_image()
    tf = build_classification_transforms("cifar100", train=True)

    def draws(seed: int) -> list[torch.Tensor]:
        tf.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return [tf(image=image)["image"] for _ in range(8)]

    a, b, c = draws(5), draws(5), draws(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # the seed argument gives the same stream as a later set_random_state with that seed
    d = build_classification_transforms("cifar100", train=True, seed=5)
    assert all(torch.equal(x, d(image=image)["image"]) for x in a)


def test_seeded_samples_gives_each_sample_its_own_repeatable_augmentation(standin):
    ds = CifarDataset(standin, "cifar10", train=True, transform=build_classification_transforms("cifar10", True))
    seeded = SeededSamples(ds)
    first = [seeded[(i, 100 + i)][0] for i in range(6)]
    seeded[(0, 7)]  # another sample in between changes nothing
    again = [seeded[(i, 100 + i)][0] for i in reversed(range(6))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    variants = {seeded[(0, seed)][0].numpy().tobytes() for seed in range(8)}
    assert len(variants) > 1, "different sample seeds give different augmentations"
