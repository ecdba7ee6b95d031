"""MNIST / Fashion-MNIST from the official idx files (seg/data/mnist.py): the generated stand-in read back,
the reference's transforms, and a one-line error naming the file, what was expected and where the files go."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from seg.data.cityscapes import DatasetError
from seg.data.classification_transforms import UnknownDatasetError, build_classification_transforms
from seg.data.idx import idx_bytes, write_idx
from seg.data.mnist import ALL_FILES, FILES, MnistDataset
from seg.data.mnist_standin import StandinError, generate_mnist_standin
from tools import make_mnist_standin as standin_tool

TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 2


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_mnist_standin(tmp_path_factory.mktemp("mnist"), TRAIN_PER_CLASS, TEST_PER_CLASS, seed=0)


def copy_standin(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst / "copy")
    return dst / "copy"


# --------------------------------------------------------------------------------------------
# the stand-in and the reader


@pytest.mark.parametrize("kind", ["mnist", "fashion_mnist"])
def test_standin_reads_back_as_the_official_format(kind: str, tmp_path: Path) -> None:
    root = generate_mnist_standin(tmp_path, TRAIN_PER_CLASS, TEST_PER_CLASS, seed=0, kind=kind)
    assert sorted(p.name for p in root.iterdir()) == sorted(ALL_FILES)
    # the official magic numbers: 2051 (ubyte, 3 dims) for images, 2049 (ubyte, 1 dim) for labels
    for images, labels in FILES.values():
        assert int.from_bytes((root / images).read_bytes()[:4], "big") == 2051
        assert int.from_bytes((root / labels).read_bytes()[:4], "big") == 2049
    train, test = MnistDataset(root, kind, train=True), MnistDataset(root, kind, train=False)
    assert (len(train), len(test)) == (10 * TRAIN_PER_CLASS, 10 * TEST_PER_CLASS)
    assert train.images.shape == (30, 28, 28) and train.images.dtype == np.uint8
    assert np.bincount(train.targets, minlength=10).tolist() == [TRAIN_PER_CLASS] * 10
    assert train.targets[:10] != sorted(train.targets[:10])  # shuffled, as the official files are
    assert len(train.classes) == 10 and train.num_classes == 10
    assert (train.classes[0], train.classes[9]) == (("0", "9") if kind == "mnist" else ("T-shirt/top", "Ankle boot"))
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and label.item() == train.targets[0]
    # strokes on a dark background, each image different
    assert np.median(train.images) < 40 and train.images.max() > 150
    assert len({im.tobytes() for im in train.images}) == len(train)


def test_standin_is_deterministic_and_gzip_holds_the_same_arrays(standin: Path, tmp_path: Path) -> None:
    again = generate_mnist_standin(tmp_path / "again", TRAIN_PER_CLASS, TEST_PER_CLASS, seed=0)
    other = generate_mnist_standin(tmp_path / "other", TRAIN_PER_CLASS, TEST_PER_CLASS, seed=1)
    for name in ALL_FILES:
        assert (again / name).read_bytes() == (standin / name).read_bytes()
    assert (other / ALL_FILES[0]).read_bytes() != (standin / ALL_FILES[0]).read_bytes()
    gz = generate_mnist_standin(tmp_path / "gz", TRAIN_PER_CLASS, TEST_PER_CLASS, seed=0, gzip=True)
    assert sorted(p.name for p in gz.iterdir()) == sorted(f"{n}.gz" for n in ALL_FILES)
    plain, packed = MnistDataset(standin, "mnist", True), MnistDataset(gz, "mnist", True)
    assert np.array_equal(plain.images, packed.images) and plain.targets == packed.targets


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"train_per_class": 0}, "train_per_class"),
    ({"test_per_class": 1001}, "test_per_class"),
    ({"seed": -1}, "seed"),
    ({"kind": "kmnist"}, "kind"),
])
def test_standin_rejects_bad_parameters(tmp_path: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises(StandinError, match=needle):
        generate_mnist_standin(tmp_path, **{"train_per_class": 1, "test_per_class": 1, **kwargs})


def test_tool_writes_a_readable_set_and_reports_errors_in_one_line(tmp_path: Path, capsys) -> None:
    argv = ["--root", str(tmp_path / "s"), "--kind", "fashion_mnist", "--train-per-class", "1", "--test-per-class", "1"]
    assert standin_tool.main(argv) == 0
    assert len(MnistDataset(tmp_path / "s", "fashion_mnist", train=False)) == 10
    capsys.readouterr()
    assert standin_tool.main(["--root", str(tmp_path / "s"), "--train-per-class", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train_per_class" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------
# transforms: the reference's main.py


def test_mnist_normalises_and_fashion_only_scales() -> None:
    image = np.arange(28 * 28, dtype=np.int64).reshape(28, 28).astype(np.uint8)
    for train in (True, False):  # the reference augments neither split
        mnist = build_classification_transforms("mnist", train)(image=image)["image"]
        fashion = build_classification_transforms("fashion_mnist", train)(image=image)["image"]
        expected = torch.from_numpy(image.astype(np.float32) / 255)[None]
        assert mnist.shape == fashion.shape == (1, 28, 28)
        torch.testing.assert_close(mnist, (expected - 0.1307) / 0.3081)
        torch.testing.assert_close(fashion, expected)
    with pytest.raises(UnknownDatasetError, match="mnist, fashion_mnist"):
        MnistDataset("nowhere", "kmnist", train=True)


# --------------------------------------------------------------------------------------------
# one-line errors


def _error(root: Path, name: str = "mnist", train: bool = True) -> str:
    with pytest.raises(DatasetError) as e:
        MnistDataset(root, name, train)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_file_says_where_the_files_go(standin: Path, tmp_path: Path) -> None:
    msg = _error(tmp_path / "none")
    assert msg.startswith(f"{tmp_path / 'none' / 'train-images-idx3-ubyte'} not found: put the four official MNIST idx")
    assert all(n in msg for n in ALL_FILES) and msg.endswith(f"in {tmp_path / 'none'}")
    root = copy_standin(standin, tmp_path)
    (root / "t10k-labels-idx1-ubyte").unlink()
    assert _error(root, train=False).startswith(f"{root / 't10k-labels-idx1-ubyte'} not found")
    assert len(MnistDataset(root, "mnist", train=True)) == 30  # the training files alone still read
    assert "Fashion-MNIST idx files" in _error(tmp_path / "none", "fashion_mnist")


def test_files_in_torchvisions_layout_are_pointed_at(standin: Path, tmp_path: Path) -> None:
    shutil.copytree(standin, tmp_path / "data" / "MNIST" / "raw")
    assert f"{tmp_path / 'data' / 'MNIST' / 'raw'} holds them" in _error(tmp_path / "data")
    assert len(MnistDataset(tmp_path / "data" / "MNIST" / "raw", "mnist", True)) == 30


def test_bad_magic_names_the_file(standin: Path, tmp_path: Path) -> None:
    root = copy_standin(standin, tmp_path)
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(b"GIF89a" + path.read_bytes()[6:])
    msg = _error(root)
    assert str(path) in msg and "not an idx file" in msg and "0x00000803" in msg
    # labels where images belong: a valid idx file of the wrong kind
    shutil.copy(root / "train-labels-idx1-ubyte", path)
    msg = _error(root)
    assert str(path) in msg and "uint8 N x 28 x 28" in msg


def test_count_mismatch_names_both_files(standin: Path, tmp_path: Path) -> None:
    root = copy_standin(standin, tmp_path)
    labels = MnistDataset(root, "mnist", train=False).targets
    write_idx(root / "t10k-labels-idx1-ubyte", np.array(labels[:-1], np.uint8))
    msg = _error(root, train=False)
    assert "t10k-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg and "20 images but 19 labels" in msg


def test_truncated_files_plain_and_gzipped(standin: Path, tmp_path: Path) -> None:
    root = copy_standin(standin, tmp_path)
    path = root / "train-images-idx3-ubyte"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    msg = _error(root)
    assert str(path) in msg and "truncated" in msg and "30 x 28 x 28" in msg
    path.unlink()
    gz = root / "train-images-idx3-ubyte.gz"
    write_idx(gz, MnistDataset(standin, "mnist", True).images)
    assert len(MnistDataset(root, "mnist", True)) == 30  # the .gz is read when the plain file is absent
    gz.write_bytes(gz.read_bytes()[:-30])
    msg = _error(root)
    assert str(gz) in msg and "damaged" in msg


def test_wrong_image_size_and_label_range(standin: Path, tmp_path: Path) -> None:
    root = copy_standin(standin, tmp_path)
    (root / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((20, 32, 32), np.uint8)))
    assert "(20, 32, 32)" in _error(root, train=False) and "28 x 28" in _error(root, train=False)
    write_idx(root / "train-labels-idx1-ubyte", np.full(30, 10, np.uint8))
    assert "label 10 outside 0..9" in _error(root)
