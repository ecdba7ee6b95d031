"""Random streams for data loading: one per DDP rank and per DataLoader worker, all derived from the run seed.

albumentations 2.x ignores the global ``random``/``numpy`` seeds: every ``Compose`` owns its generators, and a
forked DataLoader worker inherits an identical copy of them. :func:`worker_init_fn` therefore reseeds the
dataset's transform in each worker from ``torch.initial_seed()``, which PyTorch sets to a per-worker value
drawn from the loader's generator; :func:`make_generator` makes that generator depend on (seed, rank).

Typical use::

    gen = make_generator(cfg.train.seed, rank)
    loader = DataLoader(ds, ..., generator=gen, worker_init_fn=worker_init_fn)
    seed_dataset_transforms(ds, derive_seed(cfg.train.seed, rank))  # only matters with num_workers=0
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

_MASK63 = (1 << 63) - 1


def derive_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed from ``seed`` and extra keys (rank, worker id, ...); deterministic, and
    distinct keys give unrelated seeds."""
    if seed < 0 or any(k < 0 for k in keys):
        raise ValueError(f"derive_seed: seed and keys must be >= 0, got seed={seed}, keys={keys}")
    hi, lo = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return ((int(hi) << 32) | int(lo)) & _MASK63


def make_generator(seed: int, rank: int = 0) -> torch.Generator:
    """The DataLoader generator of process ``rank``: it decides worker base seeds (and shuffling when no
    sampler is given), so different ranks get different streams and a rerun gets the same ones."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, rank))
    return gen


def _transforms_of(dataset: Any) -> list[Any]:
    """Transforms reachable from a dataset, looking through Subset / ConcatDataset wrappers."""
    found: list[Any] = []
    stack = [dataset]
    while stack:
        ds = stack.pop()
        tf = getattr(ds, "transform", None)
        if tf is not None:
            found.append(tf)
        if getattr(ds, "dataset", None) is not None:
            stack.append(ds.dataset)
        stack.extend(getattr(ds, "datasets", []) or [])
    return found


def seed_transform(transform: Any, seed: int) -> None:
    """Give an albumentations pipeline one fresh stream. ``set_random_state`` shares a single generator among
    all its transforms (``set_random_seed`` would give each transform the same seed, correlating e.g. the
    flip decision with the jitter decision). Objects without either method are left alone."""
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    elif hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def seed_dataset_transforms(dataset: Any, seed: int) -> None:
    """Reseed every transform of ``dataset`` (e.g. in the main process when ``num_workers=0``)."""
    for tf in _transforms_of(dataset):
        seed_transform(tf, seed)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader hook: seed python, numpy and the dataset's transforms from this worker's torch seed."""
    info = torch.utils.data.get_worker_info()
    # PyTorch sets the worker's torch seed to base_seed + worker_id, base_seed drawn from the loader's
    # generator (once per epoch, so epochs differ too).
    seed = derive_seed(torch.initial_seed() & _MASK63, worker_id)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    if info is not None:
        seed_dataset_transforms(info.dataset, seed)
