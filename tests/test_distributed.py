"""seg.distributed: rank, world size and count sums without a process group and in a one-process gloo group."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from seg import distributed


def test_one_process_without_a_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    assert not distributed.group_initialized()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    assert not distributed.is_distributed() and distributed.is_main_process() and not distributed.group_on_cuda()
    counts = torch.arange(4)
    assert distributed.sum_counts(counts) is counts  # nothing to sum


def test_a_group_of_one_process_is_not_distributed(gloo_group, monkeypatch: pytest.MonkeyPatch) -> None:
    assert distributed.group_initialized() and not distributed.group_on_cuda()  # gloo: sums on the CPU
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    assert not distributed.is_distributed() and distributed.is_main_process()
    # Told there are two processes, the counts go through the group's all_reduce (the identity with one).
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    assert distributed.is_distributed()
    counts = torch.tensor([[3, 1], [0, 2]])
    summed = distributed.sum_counts(counts)
    assert summed is not counts and torch.equal(summed, counts) and summed.device == counts.device


def test_only_seg_distributed_asks_the_process_group() -> None:
    # The rule of CONTRIBUTING.md: rank, world size and the backend come from seg.distributed.
    seg = Path(__file__).resolve().parents[1] / "seg"
    asks = re.compile(r"\bdist\.(get_rank|get_world_size|is_initialized|get_backend)\(")
    offenders = [str(p.relative_to(seg)) for p in sorted(seg.rglob("*.py"))
                 if p.name != "distributed.py" or p.parent != seg
                 if asks.search(p.read_text())]
    assert not offenders, f"ask seg.distributed instead: {offenders}"
