"""Atomic checkpoint writes, weights_only loading, RNG state round trips, the best-model decision."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from seg.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, same_checkpoint, save_checkpoint
from seg.engine.checkpointer import capture_rng, params_finite, restore_rng


def _draws() -> tuple[torch.Tensor, np.ndarray, list[float]]:
    return torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)]


def test_rng_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.randn()  # leaves a cached gaussian in NumPy's state
    save_checkpoint({"model": {}, "config": {}, "rng": capture_rng()}, tmp_path / "c.pth")
    expected = _draws()
    _draws()  # move every stream on
    restore_rng(load_checkpoint(tmp_path / "c.pth")["rng"])
    got = _draws()
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {}, "iteration": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        save_checkpoint({"model": {}, "config": {}, "bad": lambda: None}, path)
    assert load_checkpoint(path)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]  # no temporary file left behind


@pytest.mark.parametrize("links", [True, False])
def test_best_shares_last_and_keeps_it_when_last_moves_on(
    tmp_path: Path, links: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not links:  # a filesystem without hard links: a copy
        def no_link(*args, **kwargs):
            raise OSError("hard links not supported")
        monkeypatch.setattr("seg.checkpoint.os.link", no_link)
    last, best = tmp_path / "last.pth", tmp_path / "best.pth"
    save_checkpoint({"model": {"w": torch.zeros(2)}, "config": {}, "iteration": 1}, best)  # an older best
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {}, "iteration": 2}, last)
    assert same_checkpoint(last, best) == best
    assert load_checkpoint(best)["iteration"] == 2
    assert last.samefile(best) is links
    save_checkpoint({"model": {"w": torch.full((2,), 3.0)}, "config": {}, "iteration": 3}, last)
    assert load_checkpoint(last)["iteration"] == 3
    kept = load_checkpoint(best)
    assert kept["iteration"] == 2 and torch.equal(kept["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "last.pth"]  # no temporary file left


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_checkpoint(tmp_path / "junk.pth")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(tmp_path / "foreign.pth")


def test_latest_and_finite(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint({"model": {}, "config": {}}, tmp_path / "last.pth")
    assert latest_checkpoint(tmp_path) == tmp_path / "last.pth"
    layer = torch.nn.Linear(2, 2)
    assert params_finite(layer)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    assert not params_finite(layer)
