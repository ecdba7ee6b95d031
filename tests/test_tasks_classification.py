"""Classification as the engine's second task: configs, top-k metrics (over processes), training on a CIFAR
stand-in and an ImageNet-style folder, exact resume, tools/eval.py on a classification checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from seg.checkpoint import load_checkpoint
from seg.config import Config, ConfigError, load_config
from seg.data import generate_cifar10_standin
from seg.engine import DistInfo, train
from seg.evaluation import ShardedEvalSampler, build_eval_loader
from seg.evaluation.topk import TopKAccuracy, evaluate_classification, topk_correct
from seg.models.cifar import CIFAR_ARCHS
from seg.tasks import TASKS, DataRootError, build_task
from tools import eval as eval_tool

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# The paper-recipe configs (the CPU stand-in run has its own test).
CLASSIFICATION = sorted(p for d in ("cifar10", "cifar100", "imagenet") for p in (CONFIGS / d).glob("*.yaml")
                        if not p.stem.startswith("standin"))


# --------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("path", CLASSIFICATION, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_classification_configs_load_with_the_paper_recipe(path: Path) -> None:
    cfg = load_config(path)
    m, t = cfg.model, cfg.train
    assert cfg.task == "classification" and t.schedule == "cosine" and (t.momentum, t.lr) == (0.9, 0.1)
    assert m.block_fc == (0 if m.norm == "bn" else (64 if cfg.data.dataset == "imagenet" else 512))
    if cfg.data.dataset == "imagenet":
        assert m.arch.startswith("tv:") and m.num_classes == 1000 and t.weight_decay == 1e-4
        assert t.batch_size * 8 == 256 and t.iterations == 90 * math.ceil(1281167 / 256)
    else:
        assert m.arch in CIFAR_ARCHS and m.num_classes == (10 if cfg.data.dataset == "cifar10" else 100)
        assert (t.batch_size, t.weight_decay, t.iterations) == (128, 1e-3, 20 * math.ceil(50000 / 128))
        assert (m.deconv.block, m.deconv.sampling_stride, m.deconv.n_iter, m.deconv.eps) == (64, 3, 5, 1e-5)
    if path.stem != "base":  # every run of a table has its own folder
        assert cfg.work_dir == f"checkpoints/{cfg.data.dataset}/{path.stem}"


def test_standin_config_is_the_cpu_smoke_run() -> None:
    cfg = load_config(CONFIGS / "cifar10" / "standin_resnet18_deconv.yaml")
    assert (cfg.model.arch, cfg.model.norm, cfg.data.root) == ("resnet18", "deconv", "datasets/cifar_standin")
    assert cfg.data.num_workers <= 1 and cfg.train.amp == "none"


# --------------------------------------------------------------------------------------------
# top-k accuracy


LOGITS = torch.tensor([
    [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],   # target 1: top-1
    [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # target 4: 5th best, top-5 only
    [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # target 5: last, neither
    [0.0, 0.1, 0.2, 0.9, 0.3, 0.4],   # target 5: 2nd best, top-5
])
TARGETS = torch.tensor([1, 4, 5, 5])


def test_topk_against_hand_counts() -> None:
    assert topk_correct(LOGITS, TARGETS).tolist() == [1, 3]
    assert topk_correct(LOGITS, TARGETS, ks=(1, 2, 6)).tolist() == [1, 2, 4]
    # Fewer classes than k: top-5 is top-(number of classes), every target is among them.
    assert topk_correct(LOGITS[:, :3], torch.tensor([0, 1, 2, 2])).tolist() == [1, 4]
    meter = TopKAccuracy()
    meter.update(LOGITS, TARGETS)
    assert meter.compute() == {"top1": 0.25, "top5": 0.75, "num_images": 4}
    with pytest.raises(ValueError, match="logits N x C"):
        topk_correct(LOGITS, TARGETS[:2])


class FixedLogits(nn.Module):
    """A 'model' whose input is its logits (the loader hands it LOGITS' rows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


def test_sharded_evaluation_with_a_summing_reduce_counts_every_image_once() -> None:
    data = TensorDataset(torch.cat([LOGITS] * 2 + [LOGITS[:1]]), torch.cat([TARGETS] * 2 + [TARGETS[:1]]))
    whole = evaluate_classification(FixedLogits(), DataLoader(data, batch_size=2), "cpu")
    assert whole == {"top1": 3 / 9, "top5": 7 / 9, "num_images": 9}

    def shard(rank: int) -> DataLoader:  # 9 images on 2 processes: 5 and 4 of them
        return DataLoader(data, batch_size=2, sampler=ShardedEvalSampler(data, rank=rank, world_size=2))

    other: list[torch.Tensor] = []
    evaluate_classification(FixedLogits(), shard(1), "cpu", all_reduce=lambda t: other.append(t.clone()))
    # Rank 0's all_reduce adds rank 1's counts (what torch.distributed.all_reduce does with two processes).
    reduced = evaluate_classification(FixedLogits(), shard(0), "cpu", all_reduce=lambda t: t.add_(other[0]))
    assert reduced == whole


def test_every_task_validates_on_the_first_val_max_images() -> None:
    data = TensorDataset(torch.arange(10))
    for limit, expected in [(None, list(range(10))), (3, [0, 1, 2]), (50, list(range(10)))]:
        cfg = Config()
        cfg.train.val_max_images = limit
        for task in TASKS.values():  # limit_val reads only train.val_max_images
            kept = task(cfg).limit_val(data)
            assert [int(kept[i][0]) for i in range(len(kept))] == expected


# --------------------------------------------------------------------------------------------
# training through the engine


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-10-format stand-in: 4 training and 2 test images per class (40 and 20)."""
    return generate_cifar10_standin(tmp_path_factory.mktemp("cifar_standin"), train_per_class=4, test_per_class=2)


def tiny_cifar(root: Path, *overrides: str) -> Config:
    """VGG-11 with deconvolution (16-channel blocks) and a Delinear classifier, batch 8, 32x32."""
    return load_config(CONFIGS / "cifar10" / "vgg16_deconv.yaml", [
        f"data.root={root}", "data.num_workers=0", "model.arch=vgg11", "model.deconv.block=16",
        "train.batch_size=8", "train.iterations=3", "train.log_interval=1", "train.val_interval=2",
        "train.checkpoint_interval=100", "eval.batch_size=8", *overrides,
    ])


def _records(work_dir: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (work_dir / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def test_cifar_training_writes_top1_top5(standin: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    result = train(tiny_cifar(standin), CPU, tmp_path, show_progress=False)
    assert (result.status, result.iteration) == ("finished", 3)
    vals = _records(tmp_path, "val")
    assert [v["iteration"] for v in vals] == [2, 3]
    assert all(0.0 <= v["top1"] <= v["top5"] <= 1.0 and v["num_images"] == 20 for v in vals)
    assert result.best_metric == max(v["top1"] for v in vals)
    assert "val @ 3: top-1 " in capsys.readouterr().out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert {"val/top1", "val/top5", "train/loss"} <= set(EventAccumulator(str(tmp_path)).Reload().Tags()["scalars"])
    limited = train(tiny_cifar(standin, "train.iterations=1", "train.val_max_images=5"), CPU, tmp_path / "limited",
                    show_progress=False)
    assert limited.last_val["num_images"] == 5


@pytest.mark.slow  # the engine's resume is checked in the fast tier by tests/test_engine_trainer.py
def test_cifar_resume_equals_an_uninterrupted_run(standin: Path, tmp_path: Path) -> None:
    # 40 images at batch 8: 5 iterations per epoch; stopping after 3 resumes mid-epoch.
    cfg = tiny_cifar(standin, "train.iterations=5", "train.val_interval=100")
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(cfg, CPU, straight, show_progress=False)
    assert train(cfg, CPU, split, show_progress=False, stop_after=3).status == "paused"
    torch.manual_seed(1234)
    assert train(cfg, CPU, split, resume=True, show_progress=False).iteration == 5
    a, b = load_checkpoint(straight / "last.pth")["model"], load_checkpoint(split / "last.pth")["model"]
    assert a.keys() == b.keys() and any(k.endswith("running_deconv") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in _records(straight, "train")] == [r["loss"] for r in _records(split, "train")]


def _eval_tool(*argv: str | Path) -> int:
    try:
        eval_tool.main([str(a) for a in argv])
    except SystemExit as e:  # the tool always ends with sys.exit(code)
        return int(e.code or 0)
    return 0


def test_eval_tool_on_a_classification_checkpoint(standin: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    result = train(tiny_cifar(standin, "train.iterations=2"), CPU, run, show_progress=False)
    capsys.readouterr()
    # Unfolded: exactly the training loop's last validation (the checkpoint was saved after it).
    ckpt = (run / "config.yaml", run / "last.pth", "--device", "cpu")
    assert _eval_tool(*ckpt, "--no-fold", "--out", tmp_path / "e") == 0
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert report["split"] == "val" and report["metrics"] == result.last_val
    assert f"top-1 {100 * result.last_val['top1']:.2f}" in capsys.readouterr().out
    # Folded (the default): deconvolution as plain convs, the same images counted.
    assert _eval_tool(*ckpt, "--batch-size", "7") == 0
    folded = json.loads((run / "eval_val" / "metrics.json").read_text())["metrics"]
    assert folded["num_images"] == 20 and abs(folded["top1"] - result.last_val["top1"]) <= 0.1
    capsys.readouterr()
    # A segmentation option with a classification checkpoint: one error line, exit code 2.
    assert _eval_tool(*ckpt, "--official") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--official" in err and "Traceback" not in err


def _write_folder(root: Path) -> Path:
    """root/{train,val}/{cat,dog}/*.png: 2 + 1 images per class, 256 x 288 random pixels."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                cv2.imwrite(str(root / split / name / f"{i}.png"), rng.integers(0, 256, (256, 288, 3), np.uint8))
    return root


def test_imagenet_style_folder_run(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "folder")
    cfg = load_config(CONFIGS / "imagenet" / "resnet18_bn.yaml", [
        f"data.root={root}", "data.num_workers=0", "model.num_classes=2", "train.batch_size=2",
        "train.iterations=1", "eval.batch_size=2",
    ])
    result = train(cfg, CPU, tmp_path / "run", show_progress=False)
    (val,) = _records(tmp_path / "run", "val")
    assert val["num_images"] == 2 and val["top5"] == 1.0  # top-5 of 2 classes: both are always in it
    assert val["top1"] in (0.0, 0.5, 1.0) and result.best_metric == val["top1"]
    wrong = load_config(CONFIGS / "imagenet" / "resnet18_bn.yaml", [f"data.root={root}"])
    with pytest.raises(ConfigError, match=r"model\.num_classes.*1000.*2 classes"):
        build_task(wrong).build_datasets()


def test_missing_cifar_points_to_the_standin(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "cifar10" / "resnet18_deconv.yaml", [f"data.root={tmp_path / 'no_cifar'}"])
    with pytest.raises(DataRootError) as e:
        build_task(cfg).build_datasets()
    assert "no_cifar" in str(e.value) and "tools/make_cifar_standin.py" in str(e.value)


def test_eval_loader_of_the_task_counts_each_image_once(standin: Path) -> None:
    task = build_task(tiny_cifar(standin))
    _, val_set = task.build_datasets()
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    metrics = task.evaluate(model, build_eval_loader(val_set, batch_size=7, num_workers=0), torch.device("cpu"), None)
    assert metrics["num_images"] == 20 and 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
