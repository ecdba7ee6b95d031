"""The task seam is real: a third task written entirely in this file (its data, model, loss, metric and config
rules) trains and evaluates through the ordinary config, engine and tools, and nothing in seg/ or tools/ names it.

The toy task fits y = x @ w with a linear model and mean-squared error; its metric is the negative validation
MSE (higher is better, as the checkpointer's best.pth expects).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from seg.config import TASK_RULES, Config, ConfigError, check_choice, from_dict, load_config
from seg.distributed import sum_counts
from seg.events import Event
from seg.tasks import TASKS, EvalRequest, Task, register_task
from tools import eval as eval_tool
from tools import train as train_tool

FEATURES = 4
WEIGHTS = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def toy_split(seed: int, n: int) -> TensorDataset:
    x = torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, x @ WEIGHTS)


class ToyRegressionTask(Task):
    name = "toy_regression"
    metric = "neg_mse"
    metric_label = "-MSE"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        check_choice("model.arch", cfg.model.arch, ("linear",))
        check_choice("data.dataset", cfg.data.dataset, ("toy",))
        check_choice("train.loss", cfg.train.loss, ("mse",))

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        return toy_split(0, 32), self.limit_val(toy_split(1, 8))

    def build_model(self, *, load_pretrained: bool = True) -> nn.Module:
        return nn.Linear(FEATURES, 1)

    def build_eval_dataset(self, split: str) -> Dataset:
        return toy_split(1 if split == "val" else 2, 8)

    def to_device(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch  # float targets: the base class's .long() is for class labels
        return inputs.to(device), targets.to(device)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(outputs.float(), targets)

    @classmethod
    def format_metric(cls, value: float) -> str:
        return f"{value:.4f}"  # not a fraction: no percentage

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None,
                 *, progress: bool = False) -> dict[str, Any]:
        sums = torch.zeros(2, dtype=torch.float64)  # squared error, samples
        for inputs, targets in loader:
            sums += torch.tensor([(model(inputs.to(device)).cpu() - targets).square().sum().item(), len(inputs)],
                                 dtype=torch.float64)
        total, count = sum_counts(sums).tolist()
        return {"neg_mse": -total / count, "num_images": int(count)}

    @classmethod
    def add_eval_arguments(cls, parser: argparse.ArgumentParser) -> list[str]:
        return [parser.add_argument("--toy-tag", help="a label the toy evaluation copies into its report").dest]

    def evaluate_checkpoint(self, model: nn.Module, trained: Config, request: EvalRequest) -> dict[str, Any]:
        return {**super().evaluate_checkpoint(model, trained, request), "tag": request.options["toy_tag"]}

    def val_event(self, iteration: int, metrics: dict[str, Any], model: nn.Module, device: torch.device) -> Event:
        return Event("val", iteration, record={"neg_mse": metrics["neg_mse"]},
                     scalars={"val/neg_mse": metrics["neg_mse"]}, line=f"val @ {iteration}: -MSE {metrics['neg_mse']}")


@pytest.fixture
def toy_task():
    """ToyRegressionTask registered as task ``toy_regression`` for one test, then forgotten again."""
    register_task(ToyRegressionTask)
    yield ToyRegressionTask
    del TASKS[ToyRegressionTask.name], TASK_RULES[ToyRegressionTask.name]


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(
        "task: toy_regression\n"
        "model: {arch: linear, num_classes: 1}\n"
        "data: {dataset: toy, num_workers: 0}\n"
        "train: {loss: mse, batch_size: 8, iterations: 6, lr: 0.05, warmup_iters: 0, amp: none, log_interval: 1,\n"
        "        val_interval: 3, checkpoint_interval: 3, val_max_images: 6}\n"
        "eval: {batch_size: 4}\n" + extra
    )
    return path


def test_the_toy_task_is_unknown_until_registered(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'task' has value 'toy_regression', expected one of .*segmentation"):
        load_config(_config(tmp_path))


def test_its_config_rules_are_its_own(toy_task, tmp_path: Path) -> None:
    assert load_config(_config(tmp_path)).task == "toy_regression"
    with pytest.raises(ConfigError) as e:
        load_config(_config(tmp_path), ["model.arch=deeplabv3"])
    assert "\n" not in str(e.value)
    assert "key 'model.arch' has value 'deeplabv3', expected one of linear" in str(e.value)
    # ...and the built-in tasks keep theirs: a toy dataset is no segmentation dataset.
    with pytest.raises(ConfigError, match=r"key 'data.dataset' has value 'toy', expected one of cityscapes"):
        from_dict({"task": "segmentation", "data": {"dataset": "toy"}})


def test_it_trains_and_evaluates_through_the_tools(toy_task, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:  # the tools end with sys.exit(code)
        train_tool.main([str(_config(tmp_path)), "--work-dir", str(run), "--device", "cpu", "--no-progress"])
    assert e.value.code == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["event"] == "val"]
    assert [r["iteration"] for r in vals] == [3, 6]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0]  # the linear fit learns
    best = max(r["neg_mse"] for r in vals)
    assert f"best val -MSE {best:.4f};" in capsys.readouterr().out
    assert {"last.pth", "best.pth"} <= {p.name for p in run.iterdir()}

    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as e:
        eval_tool.main([str(_config(tmp_path)), str(run / "last.pth"), "--device", "cpu", "--out", str(out)])
    assert e.value.code == 0
    report = json.loads((out / "metrics.json").read_text())
    # The metric of the trained weights on the val split, computed here independently of the task's evaluate.
    model = nn.Linear(FEATURES, 1)
    model.load_state_dict(torch.load(run / "last.pth", weights_only=True)["model"])
    x, y = toy_split(1, 8).tensors
    with torch.no_grad():
        expected = -(model(x) - y).square().mean().item()
    assert report["metrics"]["neg_mse"] == pytest.approx(expected, rel=1e-6)
    assert report["metrics"]["num_images"] == 8
    assert f"-MSE {expected:.4f}" in capsys.readouterr().out  # the task's summary line
    # Its own evaluation option reaches its evaluation; another task's option is refused, naming it.
    with pytest.raises(SystemExit) as e:
        eval_tool.main([str(_config(tmp_path)), str(run / "last.pth"), "--device", "cpu", "--out", str(out),
                        "--toy-tag", "t1"])
    assert e.value.code == 0 and json.loads((out / "metrics.json").read_text())["tag"] == "t1"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        eval_tool.main([str(_config(tmp_path)), str(run / "last.pth"), "--device", "cpu", "--flip"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --flip: not options of a toy_regression model's evaluation")
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"  # another task's config: refused
    with pytest.raises(SystemExit) as e:
        eval_tool.main([str(demo), str(run / "last.pth"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is a segmentation config" in err and "toy_regression model" in err
