"""SGD and the per-iteration learning-rate schedules (poly or cosine) with optional linear warmup."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from seg.config import TrainConfig


class PolyWarmup:
    """LR factor at iteration ``it``: ``(1 - it / total) ** power`` (``kind='poly'``) or
    ``(1 + cos(pi * it / total)) / 2`` (``kind='cosine'``), times a linear warmup ramp.

    A plain object (not a lambda) so the scheduler's state_dict stores its numbers.
    """

    def __init__(
        self, total: int, power: float = 0.9, warmup_iters: int = 0, warmup_ratio: float = 0.1, kind: str = "poly"
    ) -> None:
        self.total = total
        self.power = power
        self.warmup_iters = warmup_iters
        self.warmup_ratio = warmup_ratio
        self.kind = kind

    def __call__(self, it: int) -> float:
        progress = min(it, self.total) / self.total
        if self.kind == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = max(0.0, 1.0 - progress) ** self.power
        if self.warmup_iters > 0 and it < self.warmup_iters:
            factor *= self.warmup_ratio + (1.0 - self.warmup_ratio) * it / self.warmup_iters
        return factor


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with weight decay on every parameter (as the paper's recipe and mmsegmentation do)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """Stepped once per iteration."""
    schedule = PolyWarmup(cfg.iterations, cfg.poly_power, cfg.warmup_iters, cfg.warmup_ratio, kind=cfg.schedule)
    return LambdaLR(optimizer, schedule)
