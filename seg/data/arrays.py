"""Classification sets held in memory: one uint8 image array and a list of integer labels (CIFAR, MNIST)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """Indexing shared by the in-memory sets; a subclass fills ``images``, ``targets`` and ``transform``."""

    images: np.ndarray
    targets: list[int]
    transform: Callable[..., dict[str, Any]]

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """The raw pair: the uint8 image (a copy: HxWx3 for CIFAR, HxW for MNIST) and its label."""
        return self.images[index].copy(), self.targets[index]

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        image, label = self.load(index)
        return self.transform(image=image)["image"], torch.tensor(label, dtype=torch.int64)
