"""Training data order that depends only on (seed, epoch), can start mid-epoch, and splits across ranks.

Each sample also carries its own augmentation seed, derived from (seed, epoch, position), so the random
crop/flip/jitter of a sample does not depend on which DataLoader worker loads it or on whether the run
was resumed: a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, sample_seed)`` for this rank; ``set_epoch(epoch, start)`` skips ``start`` samples.

    Like ``DistributedSampler``: the epoch's permutation is padded by repetition to a multiple of
    ``num_replicas`` and rank ``r`` takes positions ``r, r + R, ...``.
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0) -> None:
        if size < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.size = size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start = 0
        self.per_rank = -(-size // num_replicas)  # ceil

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start {start} outside this rank's {self.per_rank} samples")
        self.epoch = epoch
        self.start = start

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset indices, sample seeds) of every position of ``epoch``, for all ranks."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        total = self.per_rank * self.num_replicas
        order = np.resize(order, total)  # pads by repeating from the start
        seeds = rng.integers(0, 2**31 - 1, size=total)
        return order, seeds

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self.epoch_order(self.epoch)
        positions = range(self.rank, len(order), self.num_replicas)
        for pos in list(positions)[self.start :]:
            yield int(order[pos]), int(seeds[pos])

    def __len__(self) -> int:
        return self.per_rank - self.start


class SeededSamples(Dataset):
    """Wraps a dataset so that ``ds[(index, seed)]`` augments ``ds.dataset[index]`` with RNGs seeded by ``seed``.

    The wrapped dataset's ``transform`` gets fresh generators when it supports albumentations'
    ``set_random_state``; the global torch/NumPy/Python RNGs are seeded for the call and restored after,
    so loading in the main process (``num_workers=0``) leaves the training RNG untouched.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        transform = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])
