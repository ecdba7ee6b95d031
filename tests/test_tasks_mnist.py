"""MNIST / Fashion-MNIST as classification runs: the configs carry the reference's recipe, tools/train.py trains
on the generated stand-in, the reference's L2 loss, and one-line errors for missing data and wrong pairings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from seg.config import ConfigError, load_config
from seg.data.mnist_standin import generate_mnist_standin
from seg.tasks import DataRootError, build_task
from seg.tasks.classification import l2_loss
from tools import train as train_tool

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p for d in ("mnist", "fashion_mnist") for p in (CONFIGS / d).glob("*.yaml")
                 if not p.stem.startswith("standin"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_configs_carry_the_reference_recipe(path: Path) -> None:
    cfg = load_config(path)
    m, t, d = cfg.model, cfg.train, cfg.data
    assert cfg.task == "classification" and d.dataset == path.parent.name and d.root == f"datasets/{d.dataset}"
    assert (m.arch, m.num_classes, m.block_fc, m.channel_deconv.block, m.channel_deconv.eps) == ("mlp", 10, 0, 32, 1e-2)
    assert (t.lr, t.momentum, t.weight_decay, t.batch_size, t.schedule, t.loss, t.amp) == (
        0.1, 0.9, 1e-3, 128, "cosine", "ce", "none")
    assert t.iterations == 20 * math.ceil(60000 / 128)
    if path.stem != "base":
        assert path.stem == f"mlp_{m.norm}" and cfg.work_dir == f"checkpoints/{d.dataset}/{path.stem}"


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_mnist_standin(tmp_path_factory.mktemp("mnist"), train_per_class=4, test_per_class=2)


def _train(config: str, root: Path, work_dir: Path, *overrides: str) -> int:
    """tools/train.py in this process; its exit code (the tool ends with sys.exit)."""
    try:
        return _train_main(config, root, work_dir, *overrides)
    except SystemExit as e:
        return int(e.code or 0)


def _train_main(config: str, root: Path, work_dir: Path, *overrides: str) -> int:
    return train_tool.main([str(CONFIGS / config), "--device", "cpu", "--no-progress", "--opts",
                            f"data.root={root}", f"work_dir={work_dir}", "data.num_workers=0", "train.batch_size=8",
                            "train.iterations=2", "train.val_interval=2", "train.log_interval=1", "eval.batch_size=8",
                            *overrides])


def _records(work_dir: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (work_dir / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def test_two_iterations_on_the_standin_through_tools_train(standin: Path, tmp_path: Path, capsys) -> None:
    assert _train("mnist/standin_mlp_deconv.yaml", standin, tmp_path) == 0
    (val,) = _records(tmp_path, "val")
    assert val["iteration"] == 2 and val["num_images"] == 20 and 0.0 <= val["top1"] <= val["top5"] <= 1.0
    losses = [r["loss"] for r in _records(tmp_path, "train")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert "done: 2 iterations" in capsys.readouterr().out
    state = torch.load(tmp_path / "last.pth", weights_only=True)["model"]
    assert any(k.endswith("running_deconv") for k in state)  # the ChannelDeconv layers trained


def test_l2_loss_is_the_references_scaled_mse() -> None:
    outputs, targets = torch.randn(6, 10), torch.tensor([0, 3, 9, 3, 1, 7])
    one_hot = torch.zeros(6, 10).scatter_(1, targets.view(-1, 1), 1)  # the reference's targets_to_one_hot
    torch.testing.assert_close(l2_loss(outputs, targets), nn.MSELoss()(outputs, one_hot) * 10 * 0.5)


def test_fashion_with_l2_loss_trains(standin: Path, tmp_path: Path) -> None:
    root = generate_mnist_standin(tmp_path / "fashion", 2, 1, kind="fashion_mnist")
    assert _train("fashion_mnist/mlp_bn.yaml", root, tmp_path / "run", "train.loss=l2") == 0
    (val,) = _records(tmp_path / "run", "val")
    assert val["num_images"] == 10
    task = build_task(load_config(CONFIGS / "fashion_mnist" / "mlp_bn.yaml", [f"data.root={root}", "train.loss=l2"]))
    outputs, targets = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    assert task.loss(outputs, targets) == l2_loss(outputs, targets)


def test_missing_data_is_one_line_naming_the_file_and_the_standin(tmp_path: Path, capsys) -> None:
    cfg = load_config(CONFIGS / "mnist" / "mlp_deconv.yaml", [f"data.root={tmp_path / 'mnist'}"])
    with pytest.raises(DataRootError) as e:
        build_task(cfg).build_datasets()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'mnist' / 'train-images-idx3-ubyte'} not found: put")
    assert f"data.root={tmp_path / 'mnist'}" in msg and "tools/make_mnist_standin.py" in msg
    assert _train("mnist/mlp_deconv.yaml", tmp_path / "mnist", tmp_path / "run") != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(("config", "overrides", "needle"), [
    ("mnist/mlp_bn.yaml", ["model.arch=resnet18"], "model.arch.*resnet18.*mnist"),
    ("cifar10/resnet18_bn.yaml", ["model.arch=mlp"], "model.arch.*mlp.*cifar10"),
    ("demo.yaml", ["train.loss=l2"], "train.loss.*segmentation"),
])
def test_wrong_pairings_are_config_errors(config: str, overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(CONFIGS / config, overrides)
