"""The poly schedule with warmup, per iteration, and its state through a weights_only checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seg.config import TrainConfig
from seg.engine.optim import build_optimizer, build_scheduler


def _lrs(cfg: TrainConfig, steps: int) -> list[float]:
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_poly_matches_the_formula() -> None:
    cfg = TrainConfig(lr=0.1, iterations=50, poly_power=0.9)
    for it, lr in enumerate(_lrs(cfg, 50)):
        assert lr == pytest.approx(0.1 * (1 - it / 50) ** 0.9, rel=1e-12)


def test_warmup_ramps_linearly_then_joins_poly() -> None:
    cfg = TrainConfig(lr=0.1, iterations=100, warmup_iters=10, warmup_ratio=0.1)
    lrs = _lrs(cfg, 12)
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[5] == pytest.approx(0.1 * (1 - 5 / 100) ** 0.9 * (0.1 + 0.9 * 5 / 10))
    assert lrs[10] == pytest.approx(0.1 * (1 - 10 / 100) ** 0.9)


def test_weight_decay_and_momentum_reach_sgd() -> None:
    opt = build_optimizer(torch.nn.Linear(2, 2), TrainConfig(lr=0.1, momentum=0.8, weight_decay=5e-4))
    group = opt.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.8, 5e-4)


def test_scheduler_state_resumes_from_weights_only_file(tmp_path: Path) -> None:
    cfg = TrainConfig(lr=0.1, iterations=20, warmup_iters=3)
    full = _lrs(cfg, 12)
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg)
    for _ in range(7):
        opt.step()
        sched.step()
    torch.save({"s": sched.state_dict(), "o": opt.state_dict()}, tmp_path / "s.pth")
    state = torch.load(tmp_path / "s.pth", weights_only=True)
    opt2 = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched2 = build_scheduler(opt2, cfg)
    opt2.load_state_dict(state["o"])
    sched2.load_state_dict(state["s"])
    rest = []
    for _ in range(5):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert rest == pytest.approx(full[7:])


def test_cosine_schedule_follows_the_formula() -> None:
    import math

    from seg.engine.optim import PolyWarmup

    f = PolyWarmup(100, kind="cosine")
    assert f(0) == 1.0 and abs(f(100)) < 1e-12 and f(200) == f(100)
    assert abs(f(25) - (1 + math.cos(math.pi / 4)) / 2) < 1e-12
    warm = PolyWarmup(100, warmup_iters=10, warmup_ratio=0.1, kind="cosine")
    assert abs(warm(5) - f(5) * (0.1 + 0.9 * 0.5)) < 1e-12
