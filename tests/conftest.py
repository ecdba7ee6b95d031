"""Shared fixtures: a small synthetic Cityscapes generated once per session, and a matching DataConfig."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import seg.tasks  # noqa: E402, F401  (importing it registers every task's config rules, as the tools do)
from seg.config import DataConfig  # noqa: E402

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
