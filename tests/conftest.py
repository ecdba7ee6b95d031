"""Shared fixtures: a small synthetic Cityscapes generated once per session, a matching DataConfig, the tiny
overrides that turn configs/demo.yaml into a seconds-long CPU run, and a one-process gloo group."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on two cores: one torch thread each, or the workers' thread
    # pools would oversubscribe the cores.
    torch.set_num_threads(1)

import seg.tasks  # noqa: E402, F401  (importing it registers every task's config rules, as the tools do)
from seg.config import Config, DataConfig, DeconvConfig, ModelConfig, to_dict  # noqa: E402

SYNTHETIC_SIZE = (64, 128)  # H, W: small enough for seconds-long CPU tests, big enough for every class


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic Cityscapes (train 4, val 2, test 1 images of 64x128, a 4-frame video), shared read-only."""
    from seg.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic_cityscapes")
    return generate(
        root,
        train=4,
        val=2,
        test=1,
        height=SYNTHETIC_SIZE[0],
        width=SYNTHETIC_SIZE[1],
        seed=0,
        video_frames=4,
    )


# configs/demo.yaml, seconds long on the CPU: 32x64 crops of the session's 64x128 images, no workers, a small
# deconvolution block, batch 2 (BatchNorm needs two values per channel), every iteration logged, no validation or
# periodic checkpoint before the end.
TINY_DEMO = {
    "data.crop_size": "[32,64]",
    "data.num_workers": "0",
    "model.deconv.block": "8",
    "train.batch_size": "2",
    "train.iterations": "4",
    "train.log_interval": "1",
    "train.val_interval": "100",
    "train.checkpoint_interval": "100",
    "eval.batch_size": "1",
}


def tiny_overrides(root: Path | str, *extra: str) -> list[str]:
    """``KEY=VALUE`` overrides of configs/demo.yaml for a tiny run on ``root`` (:data:`TINY_DEMO`); ``extra``
    overrides change or add keys (each key once, in TINY_DEMO's order, then the new ones)."""
    settings = {"data.root": str(root), **TINY_DEMO}
    for text in extra:
        key, _, value = text.partition("=")
        settings[key] = value
    return [f"{k}={v}" for k, v in settings.items()]


def tiny_model_cfg(**changes) -> ModelConfig:
    """A small segmentation model: DeepLabV3, ResNet-18 at output stride 16, deconvolution blocks of 16."""
    return ModelConfig(**{"encoder": "resnet18", "output_stride": 16, "deconv": DeconvConfig(block=16), **changes})


def save_untrained_checkpoint(path: Path, cfg: Config, seed: int = 0) -> Path:
    """``cfg``'s segmentation model, untrained (``torch.manual_seed(seed)``), saved as training saves a checkpoint."""
    import torch

    from seg.models import build_model

    torch.manual_seed(seed)
    torch.save({"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg), "iteration": 0}, path)
    return path


@pytest.fixture
def tiny_data_cfg(synthetic_root: Path) -> DataConfig:
    """DataConfig pointing at ``synthetic_root`` with 32x64 crops and no worker processes."""
    return DataConfig(root=str(synthetic_root), crop_size=[32, 64], scale_range=[0.75, 1.25], num_workers=0)


@pytest.fixture
def gloo_group(tmp_path: Path):
    """A gloo process group of this one process (rank 0 of 1), destroyed after the test."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
