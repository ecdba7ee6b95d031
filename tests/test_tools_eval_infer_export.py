"""tools/eval.py, tools/infer.py, tools/export.py and the official-evaluator bridge on the synthetic set."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from seg.config import Config, DataConfig, ModelConfig, to_dict
from seg.data import CityscapesDataset
from seg.data.labels import PALETTE
from seg.engine.distributed import DistInfo
from seg.evaluation import ConfusionMatrix
from seg.evaluation.official import (
    OfficialEvalError,
    core_name,
    ground_truth_files,
    prediction_path,
    run_official_eval,
    save_label_ids,
)
from tests.conftest import save_untrained_checkpoint, tiny_model_cfg
from tools import eval as eval_tool
from tools import export as export_tool
from tools import infer as infer_tool

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
HAVE_ONNX = all(importlib.util.find_spec(name) is not None for name in ONNX_PACKAGES)
# Export examples are 64x96 (multiples of 16); checks run at sizes that are not, so the pad-and-crop and
# the dynamic H, W of the exported graph are both exercised.
ODD_INPUT = (2, 3, 40, 72)


def version_tuple(version: str) -> tuple[int, ...]:
    """'2.10.1' -> (2, 10): compared as numbers ('2.10' < '2.4' as strings)."""
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny model saved the way training saves checkpoints."""
    return save_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "last.pth", Config(model=tiny_model_cfg()))


@pytest.fixture(scope="module")
def config_file(synthetic_root, tmp_path_factory) -> Path:
    cfg = Config(data=DataConfig(root=str(synthetic_root), num_workers=0))
    path = tmp_path_factory.mktemp("cfg") / "eval.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def _corrupted_predictions(root: Path, split: str, out: Path) -> ConfusionMatrix:
    """Deterministically corrupted ground truth written as labelId predictions; returns their matrix."""
    ds = CityscapesDataset(root, split)
    cm = ConfusionMatrix(19)
    rng = np.random.default_rng(0)
    for i, (image_path, _) in enumerate(ds.files):
        _, gt = ds.load(i)
        pred = gt.astype(np.int64).copy()
        pred[pred == 255] = rng.integers(0, 19)
        pred[:, : gt.shape[1] // 3] = (pred[:, : gt.shape[1] // 3] + 1 + i) % 19  # a wrong band
        noise = rng.random(gt.shape) < 0.2
        pred[noise] = rng.integers(0, 19, size=int(noise.sum()))
        save_label_ids(pred.astype(np.uint8), prediction_path(out, image_path))
        cm.update(torch.from_numpy(pred), torch.from_numpy(gt.astype(np.int64)))
    return cm


def test_version_tuple_compares_numbers():
    assert version_tuple("2.10.0") > version_tuple("2.4.1") and version_tuple("2.4.0rc1") == (2, 4)


def test_official_evaluator_agrees_with_internal_miou(synthetic_root, tmp_path):
    internal = _corrupted_predictions(synthetic_root, "val", tmp_path / "pred").compute()
    had_in1d = hasattr(np, "in1d")
    official = run_official_eval(tmp_path / "pred", synthetic_root, "val", json_out=tmp_path / "off.json")
    assert 0.05 < internal["miou"] < 0.95  # a non-trivial score
    assert abs(100 * official["miou"] - 100 * internal["miou"]) < 0.05
    # Per class too (classes absent from the ground truth and the predictions are NaN in both).
    from seg.data.labels import CLASS_NAMES

    for name, iou in zip(CLASS_NAMES, internal["iou"], strict=True):
        assert official["class_iou"][name] == pytest.approx(iou, abs=1e-9, nan_ok=True)
    assert 0 <= official["iiou"] <= 1 and set(official["category_iou"]) >= {"flat", "vehicle"}
    assert (tmp_path / "off.json").is_file()
    # The np.in1d shim is removed again: NumPy looks as before, and from 2.4 on it has no in1d.
    assert hasattr(np, "in1d") == had_in1d
    if version_tuple(np.__version__) >= (2, 4):
        assert not hasattr(np, "in1d")


def test_official_evaluator_errors_become_exceptions(synthetic_root, tmp_path):
    _corrupted_predictions(synthetic_root, "val", tmp_path / "pred")
    first = sorted((tmp_path / "pred").glob("*.png"))[0]
    first.unlink()
    with pytest.raises(OfficialEvalError, match="no prediction"):
        run_official_eval(tmp_path / "pred", synthetic_root, "val")
    # A wrongly sized prediction is the evaluator's own sys.exit, turned into an exception.
    gt = ground_truth_files(synthetic_root, "val")[0]
    cv2.imwrite(str(tmp_path / "pred" / f"{core_name(gt)}_x.png"), np.zeros((5, 5), np.uint8))
    with pytest.raises(OfficialEvalError, match="cityscapesscripts evaluator failed"):
        run_official_eval(tmp_path / "pred", synthetic_root, "val")


def test_eval_tool_internal_and_official(config_file, checkpoint, tmp_path, capsys):
    args = eval_tool.parse_args([str(config_file), str(checkpoint), "--official", "--out", str(tmp_path)])
    assert eval_tool.run(args, CPU) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["metrics"]["num_images"] == 2
    assert abs(100 * report["official"]["miou"] - 100 * report["metrics"]["miou"]) < 0.05
    text = capsys.readouterr().out
    assert "mIoU" in text and "class mIoU" in text and "traffic light" in text


def test_eval_tool_format_only_writes_the_server_layout(config_file, checkpoint, synthetic_root, tmp_path):
    args = eval_tool.parse_args(
        [str(config_file), str(checkpoint), "--split", "test", "--format-only", "--out", str(tmp_path)]
    )
    assert eval_tool.run(args, CPU) == 0
    pngs = sorted((tmp_path / "pred_labelIds").glob("*.png"))
    images = sorted((synthetic_root / "leftImg8bit" / "test").glob("*/*.png"))
    assert [core_name(p) for p in pngs] == [core_name(p) for p in images]
    label = cv2.imread(str(pngs[0]), cv2.IMREAD_UNCHANGED)
    assert label.dtype == np.uint8 and label.shape == cv2.imread(str(images[0])).shape[:2]
    from seg.data.labels import TRAIN_TO_LABEL_LUT

    assert set(np.unique(label)) <= set(TRAIN_TO_LABEL_LUT[:19].tolist())  # labelIds, not trainIds


def test_infer_images_with_a_bad_input(config_file, checkpoint, synthetic_root, tmp_path, capsys):
    val_dir = synthetic_root / "leftImg8bit" / "val"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "out"
    code = infer_tool.main([str(config_file), str(checkpoint), str(val_dir), str(broken), "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.png" in errors[0] and "Traceback" not in err
    images = sorted(val_dir.glob("*/*.png"))
    for kind in ("mask", "color", "overlay"):
        assert len(list(out.rglob(f"*_{kind}.png"))) == len(images)
    mask = cv2.imread(str(next(out.rglob("*_mask.png"))), cv2.IMREAD_UNCHANGED)
    color = cv2.cvtColor(cv2.imread(str(next(out.rglob("*_color.png")))), cv2.COLOR_BGR2RGB)
    assert mask.max() < 19 and np.array_equal(color, PALETTE[mask])


def test_infer_video_keeps_frames_size_and_fps(config_file, checkpoint, synthetic_root, tmp_path, capsys):
    video = synthetic_root / "demoVideo" / "synthetic_sequence.mp4"
    code = infer_tool.main(
        [str(config_file), str(checkpoint), str(video), "--out", str(tmp_path), "--batch-size", "2"]
    )
    assert code == 0
    assert "frames/s" in capsys.readouterr().out

    def props(path):
        cap = cv2.VideoCapture(str(path))
        n = 0
        while cap.read()[0]:
            n += 1
        p = (
            n,
            int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            cap.get(cv2.CAP_PROP_FPS),
        )
        cap.release()
        return p

    src, dst = props(video), props(tmp_path / "synthetic_sequence_seg.mp4")
    assert src[0] > 0 and dst == src


def _eager_logits(checkpoint: Path, x: torch.Tensor) -> torch.Tensor:
    """The checkpoint's model as trained (deconvolution not folded), in eval mode."""
    from seg.inference import load_checkpoint_model, segmentation_model

    with torch.no_grad():
        return load_checkpoint_model(checkpoint, build=segmentation_model)[0](x)["out"]


def test_export_torchscript_matches_eager(config_file, checkpoint, tmp_path, capsys):
    out = tmp_path / "model.ts.pt"
    argv = [str(config_file), str(checkpoint), "--format", "torchscript", "--out", str(out), "--size", "64", "96"]
    assert export_tool.main(argv) == 0 and out.is_file()
    assert "dynamic" in capsys.readouterr().out
    from seg.export import run_torchscript

    x = torch.randn(*ODD_INPUT, generator=torch.Generator().manual_seed(2))
    got = run_torchscript(out, x)
    assert got.shape == (*ODD_INPUT[:1], 19, *ODD_INPUT[2:])
    torch.testing.assert_close(got, _eager_logits(checkpoint, x), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(
    not HAVE_ONNX, reason="onnx, onnxruntime and onnxscript are not installed (pip install -e '.[onnx]')"
)
def test_export_onnx_matches_eager(config_file, checkpoint, tmp_path, capsys):
    import onnx

    from seg.export import run_onnx

    out = tmp_path / "model.onnx"
    argv = [str(config_file), str(checkpoint), "--format", "onnx", "--out", str(out), "--size", "64", "96"]
    assert export_tool.main(argv) == 0 and out.is_file()
    assert "dynamic N, H, W" in capsys.readouterr().out
    # Batch, height and width of the graph's input are symbolic, not the example's 1x3x64x96.
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.HasField("dim_param") for d in dims] == [True, False, True, True]
    x = torch.randn(*ODD_INPUT, generator=torch.Generator().manual_seed(2))
    got = run_onnx(out, x)  # onnxruntime on the file just written
    assert got.shape == (*ODD_INPUT[:1], 19, *ODD_INPUT[2:])
    torch.testing.assert_close(got, _eager_logits(checkpoint, x), atol=1e-4, rtol=1e-4)


def test_export_onnx_without_the_packages_explains(config_file, checkpoint, tmp_path, capsys, monkeypatch):
    for name in ONNX_PACKAGES:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    argv = [str(config_file), str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    assert export_tool.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install -e '.[onnx]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny model with the paper's 21 outputs (void, 19 classes, unused)."""
    cfg = Config(model=tiny_model_cfg(num_classes=21), data=DataConfig(label_mapping="reference"))
    return save_untrained_checkpoint(tmp_path_factory.mktemp("ckpt21") / "last.pth", cfg, seed=1)


def test_eval_tool_gives_both_metrics_of_a_paper_checkpoint(synthetic_root, reference_checkpoint, tmp_path, capsys):
    # A paper-style config (the paper's labels, validation at a short side) at a small size for CPU.
    cfg = Config(model=ModelConfig(num_classes=21),
                 data=DataConfig(root=str(synthetic_root), num_workers=0, label_mapping="reference", val_short_side=48))
    config = tmp_path / "paper.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    args = eval_tool.parse_args([str(config), str(reference_checkpoint), "--out", str(tmp_path)])
    assert eval_tool.run(args, CPU) == 0
    text = capsys.readouterr().out
    assert "19 Cityscapes classes at short side 48" in text and "NOT the Cityscapes benchmark metric" in text
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert len(metrics["iou"]) == 19 and len(metrics["iou_reference"]) == 21
    assert metrics["class_names_reference"][0] == "void" and metrics["class_names"][0] == "road"
    cm = ConfusionMatrix(21)
    cm.mat = torch.tensor(json.loads((tmp_path / "metrics.json").read_text())["confusion_matrix"])
    from seg.evaluation.evaluator import benchmark_from_reference, reference_miou

    assert metrics["miou_reference"] == pytest.approx(reference_miou(cm))
    assert metrics["miou"] == pytest.approx(benchmark_from_reference(cm)["miou"])
    assert cm.mat.sum() == 2 * 48 * 96 and cm.mat[0].sum() > 0  # every pixel, void rows included
    with pytest.raises(Exception, match="full resolution"):
        eval_tool.run(eval_tool.parse_args([str(config), str(reference_checkpoint), "--official"]), CPU)


def test_paper_checkpoint_on_the_benchmark_config_agrees_with_the_official_evaluator(
    config_file, reference_checkpoint, tmp_path
):
    # Full resolution, 19 classes: a void (or unused) prediction is written as 'unlabeled', which the
    # official evaluator counts as a miss of the true class, as benchmark_from_reference does.
    args = eval_tool.parse_args([str(config_file), str(reference_checkpoint), "--official", "--out", str(tmp_path)])
    assert eval_tool.run(args, CPU) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    cm = torch.tensor(report["confusion_matrix"])
    assert cm.shape == (21, 21) and (cm[1:20, 0].sum() + cm[1:20, 20].sum()) > 0  # void predictions happened
    assert abs(100 * report["official"]["miou"] - 100 * report["metrics"]["miou"]) < 0.05


def test_infer_with_a_paper_checkpoint_gives_train_ids(config_file, reference_checkpoint, synthetic_root, tmp_path):
    from seg.data.labels import reference_to_train
    from seg.inference import Predictor

    image_path = sorted((synthetic_root / "leftImg8bit" / "val").glob("*/*.png"))[0]
    out = tmp_path / "out"
    assert infer_tool.main([str(config_file), str(reference_checkpoint), str(image_path), "--out", str(out)]) == 0
    mask = cv2.imread(str(next(out.rglob("*_mask.png"))), cv2.IMREAD_UNCHANGED)
    predictor = Predictor.from_checkpoint(reference_checkpoint, device="cpu")
    rgb = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB)
    ids = predictor.predict_tensor(predictor.normalize([rgb]))[0].numpy()  # the paper's 21 ids
    assert np.array_equal(mask, reference_to_train(ids)) and (ids == 0).any()  # void shown as ignore (255)
