"""Training order from (seed, epoch) only, mid-epoch starts, rank splits, per-sample augmentation seeds."""

from __future__ import annotations

import random

import numpy as np
import torch

from seg.engine.sampling import ResumableSampler, SeededSamples


def test_order_depends_only_on_seed_and_epoch() -> None:
    a, b = ResumableSampler(10, seed=1), ResumableSampler(10, seed=1)
    a.set_epoch(3)
    list(ResumableSampler(10, seed=1))  # other samplers do not interfere
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert [i for i, _ in a] != [i for i, _ in b]
    c = ResumableSampler(10, seed=2)
    c.set_epoch(3)
    assert [i for i, _ in a] != [i for i, _ in c]
    assert sorted(i for i, _ in a) == list(range(10))


def test_start_skips_exactly_the_consumed_samples() -> None:
    s = ResumableSampler(11, seed=0)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=4)
    assert list(s) == full[4:] and len(s) == 7


def test_ranks_partition_the_padded_epoch() -> None:
    ranks = [ResumableSampler(7, num_replicas=3, rank=r, seed=5) for r in range(3)]
    for s in ranks:
        s.set_epoch(1)
    parts = [list(s) for s in ranks]
    assert {len(p) for p in parts} == {3}  # 7 padded to 9
    assert set().union(*({i for i, _ in p} for p in parts)) == set(range(7))
    seeds = [sd for p in parts for _, sd in p]
    assert len(set(seeds)) == len(seeds)  # every position draws its own augmentation


class _Noisy(torch.utils.data.Dataset):
    transform = None

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[float, float, float]:
        return torch.rand(1).item(), float(np.random.rand()), random.random()


def test_seeded_samples_are_reproducible_and_leave_global_rng_alone() -> None:
    ds = SeededSamples(_Noisy())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = ds[(1, 123)]
    assert torch.equal(torch.get_rng_state(), before)
    assert ds[(1, 123)] == first
    assert ds[(1, 124)] != first
