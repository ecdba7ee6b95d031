"""Run by test_nn_sync.py: ChannelDeconv and Delinear (sync=True) on two gloo processes with an unequal batch
split."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seg.nn import ChannelDeconv, Delinear
from tests.dist_sync_worker import SPLIT, save_and_exit


def make_inputs(kind: str):
    """A layer (sync=True), its input and the output gradient, in float64; 6×6 images so that every rank's
    pixel count is a multiple of the sampling step (ChannelDeconv samples the flattened batch)."""
    torch.manual_seed(0)
    n = sum(SPLIT)
    if kind == "channel_deconv":
        layer = ChannelDeconv(4, eps=1e-3, sync=True).double()  # 6 channels: a 4-block and 2 standardised
        x = torch.randn(n, 6, 6, 6, dtype=torch.float64) * 1.5 + 0.3
        grad = torch.randn(n, 6, 6, 6, dtype=torch.float64)
    else:
        layer = Delinear(12, 5, block=4, sync=True).double()
        x = torch.randn(n, 12, dtype=torch.float64) * 1.5 + 0.3
        grad = torch.randn(n, 5, dtype=torch.float64)
    return layer, x, grad


def worker(rank: int, out_dir: str, init_file: str, kind: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    layer, x, grad = make_inputs(kind)
    lo = sum(SPLIT[:rank])
    xl = x[lo: lo + SPLIT[rank]].clone().requires_grad_()
    for _ in range(2):  # two steps: the running statistics accumulate
        xl.grad = None
        y = layer(xl)
        y.backward(grad[lo: lo + SPLIT[rank]])
    layer.eval()
    with torch.no_grad():
        y_eval = layer(xl)
    results = {"y": y.detach(), "y_eval": y_eval, "grad_x": xl.grad, **dict(layer.named_buffers())}
    if isinstance(layer, Delinear):
        results["grad_weight"] = layer.weight.grad
    save_and_exit(rank, out_dir, results)


if __name__ == "__main__":
    out_dir = sys.argv[1]
    mp.spawn(worker, args=(out_dir, os.path.join(out_dir, "init"), sys.argv[2]), nprocs=2, join=True)
