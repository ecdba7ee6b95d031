"""Run by test_nn_iternorm.py: IterNorm(sync=True) on two gloo processes with an unequal batch split."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seg.nn import IterNorm
from tests.dist_sync_worker import save_and_exit

SPLIT = (3, 2)  # samples on rank 0 and rank 1
STEPS = 2


def make_inputs() -> tuple[IterNorm, list[torch.Tensor], list[torch.Tensor]]:
    """A float64 layer (affine not at its identity start) and one input and output gradient per step."""
    torch.manual_seed(0)
    layer = IterNorm(12, num_channels=4, T=4, momentum=0.3, sync=True).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    xs = [torch.randn(sum(SPLIT), 12, 5, 6, dtype=torch.float64) * 2 + 0.5 for _ in range(STEPS)]
    grads = [torch.randn(sum(SPLIT), 12, 5, 6, dtype=torch.float64) for _ in range(STEPS)]
    return layer, xs, grads


def worker(rank: int, out_dir: str, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    layer, xs, grads = make_inputs()
    lo, hi = sum(SPLIT[:rank]), sum(SPLIT[: rank + 1])
    for x, grad in zip(xs, grads):  # two steps: the running statistics accumulate
        layer.zero_grad()
        xl = x[lo:hi].clone().requires_grad_()
        y = layer(xl)
        y.backward(grad[lo:hi])
    save_and_exit(rank, out_dir, {"y": y.detach(), "grad_x": xl.grad, "running_mean": layer.running_mean,
                                  "running_wm": layer.running_wm, "grad_weight": layer.weight.grad,
                                  "grad_bias": layer.bias.grad})


if __name__ == "__main__":
    out_dir = sys.argv[1]
    mp.spawn(worker, args=(out_dir, os.path.join(out_dir, "init")), nprocs=2, join=True)
