"""tools/eval.py, tools/infer.py, tools/export.py and the official-evaluator bridge on the synthetic set."""

import json
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
from seg.models import build_model
from tools import eval as eval_tool
from tools import export as export_tool
from tools import infer as infer_tool

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny model saved the way training saves checkpoints."""
    cfg = Config(model=ModelConfig(encoder="resnet18", output_stride=16))
    cfg.model.deconv.block = 16
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = tmp_path_factory.mktemp("ckpt") / "last.pth"
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "iteration": 0}, path)
    return path


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


def test_official_evaluator_agrees_with_internal_miou(synthetic_root, tmp_path):
    internal = _corrupted_predictions(synthetic_root, "val", tmp_path / "pred").compute()
    official = run_official_eval(tmp_path / "pred", synthetic_root, "val", json_out=tmp_path / "off.json")
    assert 0.05 < internal["miou"] < 0.95  # a non-trivial score
    assert abs(100 * official["miou"] - 100 * internal["miou"]) < 0.05
    # Per class too (classes absent from the ground truth and the predictions are NaN in both).
    from seg.data.labels import CLASS_NAMES

    for name, iou in zip(CLASS_NAMES, internal["iou"], strict=True):
        assert official["class_iou"][name] == pytest.approx(iou, abs=1e-9, nan_ok=True)
    assert 0 <= official["iiou"] <= 1 and set(official["category_iou"]) >= {"flat", "vehicle"}
    assert (tmp_path / "off.json").is_file()
    assert not hasattr(np, "in1d") or np.__version__ < "2.4"  # the shim is removed again


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
    assert "broken.png" in capsys.readouterr().err
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


def test_export_torchscript_matches_eager(config_file, checkpoint, tmp_path, capsys):
    out = tmp_path / "model.ts.pt"
    code = export_tool.main(
        [
            str(config_file),
            str(checkpoint),
            "--format",
            "torchscript",
            "--out",
            str(out),
            "--size",
            "64",
            "96",
        ]
    )
    assert code == 0 and out.is_file()
    assert "dynamic" in capsys.readouterr().out
    from seg.export import prepare, run_torchscript
    from seg.inference import load_checkpoint_model

    eager = prepare(load_checkpoint_model(checkpoint)[0])
    x = torch.randn(1, 3, 40, 72)
    torch.testing.assert_close(run_torchscript(out, x), eager(x), atol=1e-4, rtol=1e-4)


def test_export_onnx_matches_eager_or_explains(config_file, checkpoint, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    argv = [str(config_file), str(checkpoint), "--format", "onnx", "--out", str(out), "--size", "64", "96"]
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        assert export_tool.main(argv) == 2
        assert "pip install -e '.[onnx]'" in capsys.readouterr().err
        return
    assert export_tool.main(argv) == 0 and out.is_file()
