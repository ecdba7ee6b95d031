"""The training loop in one process: checkpoints, exact resume, NaN guard, missing data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seg.checkpoint import CheckpointError, load_checkpoint
from seg.config import Config, ConfigError, from_dict, load_config
from seg.engine import DistInfo, NonFiniteLossError, train
from seg.tasks import DataRootError
from seg.tasks.segmentation import SegmentationTask
from tests.conftest import tiny_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def tiny_cfg(root: Path, *overrides: str) -> Config:
    """The demo recipe (DeepLabV3+, ResNet-18, deconvolution) on 64x128 synthetic images, 32x64 crops, batch 2."""
    return load_config(CONFIGS / "demo.yaml", tiny_overrides(root, "train.warmup_iters=1", "eval.batch_size=2",
                                                             *overrides))


def _records(work_dir: Path, event: str) -> list[dict]:
    lines = (work_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def test_a_few_iterations_write_everything(synthetic_root: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(synthetic_root, "train.iterations=3", "train.val_interval=2")
    result = train(cfg, CPU, tmp_path, show_progress=False)
    assert (result.status, result.iteration) == ("finished", 3)
    ckpt = load_checkpoint(tmp_path / "last.pth")  # weights_only=True inside
    assert ckpt["iteration"] == 3
    assert set(ckpt) >= {"model", "config", "optimizer", "scheduler", "scaler", "rng", "best_metric"}
    assert from_dict(ckpt["config"]).model == cfg.model
    assert (tmp_path / "best.pth").is_file() and (tmp_path / "config.yaml").is_file()
    assert load_config(tmp_path / "config.yaml").train == cfg.train
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path)).Reload().Tags()
    assert {"train/loss", "train/lr", "time/data", "time/iter", "val/mIoU", "val/pixel_acc", "val/mean_acc",
            "val_iou/road"} <= set(tb["scalars"])
    assert {"val/input", "val/ground_truth", "val/prediction"} <= set(tb["images"])
    vals = _records(tmp_path, "val")
    assert [v["iteration"] for v in vals] == [2, 3] and 0.0 <= vals[-1]["miou"] <= 1.0
    assert len(vals[-1]["iou"]) == 19
    losses = [r["loss"] for r in _records(tmp_path, "train")]
    assert len(losses) == 3 and all(v == v for v in losses)
    seconds = [r["train_seconds"] for r in _records(tmp_path, "train")]
    assert 0 < seconds[0] < seconds[1] < seconds[2] and vals[-1]["train_seconds"] == seconds[2]
    assert all(r["peak_mem_gb"] > 0 for r in _records(tmp_path, "train"))


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])  # a worker process: slow tier
def test_resume_equals_an_uninterrupted_run(synthetic_root: Path, tmp_path: Path, workers: int) -> None:
    # 4 training images at batch 2: iterations 1-2 are epoch 0, 3-4 epoch 1; stopping after 3 resumes mid-epoch.
    cfg = tiny_cfg(synthetic_root, f"data.num_workers={workers}", "train.iterations=5")
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(cfg, CPU, straight, show_progress=False)
    assert train(cfg, CPU, split, show_progress=False, stop_after=3).status == "paused"
    assert load_checkpoint(split / "last.pth")["iteration"] == 3
    torch.manual_seed(1234)  # whatever the process did in between must not matter
    result = train(cfg, CPU, split, resume=True, show_progress=False)
    assert result.iteration == 5
    a = load_checkpoint(straight / "last.pth")
    b = load_checkpoint(split / "last.pth")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    la = [r["loss"] for r in _records(straight, "train")]
    lb = [r["loss"] for r in _records(split, "train")]
    assert la == lb


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = SegmentationTask.loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):  # finite for two iterations, then NaN
        calls["n"] += 1
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(SegmentationTask, "loss", poisoned)
    cfg = tiny_cfg(synthetic_root, "train.checkpoint_interval=1", "train.iterations=6")
    with pytest.raises(NonFiniteLossError, match="iteration 3"):
        train(cfg, CPU, tmp_path, show_progress=False)
    ckpt = load_checkpoint(tmp_path / "last.pth")
    assert ckpt["iteration"] == 2
    assert [r["iteration"] for r in _records(tmp_path, "diverged")] == [3]  # what a study counts
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_missing_dataset_points_to_make_demo(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path / "no_such_dataset")
    with pytest.raises(DataRootError) as e:
        train(cfg, CPU, tmp_path / "run", show_progress=False)
    assert "no_such_dataset" in str(e.value) and "make demo" in str(e.value)


def test_resume_without_checkpoint_is_an_error(synthetic_root: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="last.pth"):
        train(tiny_cfg(synthetic_root), CPU, tmp_path, resume=True, show_progress=False)


REAL_EVALUATE = SegmentationTask.evaluate


def _scripted_validation(monkeypatch: pytest.MonkeyPatch, values: list[float]) -> None:
    """Validation returns the given mIoUs in turn (the real metrics otherwise): a controlled best-model test."""
    queue = list(values)

    def scripted(self, *args, **kwargs):
        metrics = REAL_EVALUATE(self, *args, **kwargs)
        metrics["miou"] = queue.pop(0)
        return metrics

    monkeypatch.setattr(SegmentationTask, "evaluate", scripted)


def test_best_checkpoint_is_the_highest_validation_and_survives_resume(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_cfg(synthetic_root, "train.iterations=4", "train.val_interval=1")
    _scripted_validation(monkeypatch, [0.3, 0.5, 0.4])
    assert train(cfg, CPU, tmp_path, show_progress=False, stop_after=3).best_metric == 0.5
    best = load_checkpoint(tmp_path / "best.pth")
    assert (best["iteration"], best["best_metric"]) == (2, 0.5)
    # After resuming, a score below the best (0.45 < 0.5) must leave best.pth alone.
    _scripted_validation(monkeypatch, [0.45])
    result = train(cfg, CPU, tmp_path, resume=True, show_progress=False)
    assert (result.iteration, result.best_metric) == (4, 0.5)
    assert load_checkpoint(tmp_path / "best.pth")["iteration"] == 2
    assert load_checkpoint(tmp_path / "last.pth")["best_metric"] == 0.5
    assert [r["miou"] for r in _records(tmp_path, "val")] == [0.3, 0.5, 0.4, 0.45]


def test_batch_larger_than_the_dataset_names_the_key(synthetic_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.batch_size"):
        train(tiny_cfg(synthetic_root, "train.batch_size=64"), CPU, tmp_path, show_progress=False)
