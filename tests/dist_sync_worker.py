"""Run by test_nn_sync.py: FastDeconv(sync=True) on two gloo processes with an unequal batch split."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seg.nn import FastDeconv

SPLIT = (3, 2)  # samples on rank 0 and rank 1


def make_inputs(stats_every: int = 1, matrix_grad: bool = True, norm_type: str = "none"):
    torch.manual_seed(0)
    layer = FastDeconv(8, 5, 3, padding=1, block=4, sync=True, stats_every=stats_every,
                       matrix_grad=matrix_grad, norm_type=norm_type).double()
    x = torch.randn(sum(SPLIT), 8, 10, 9, dtype=torch.float64) * 1.5 + 0.3
    grad = torch.randn(sum(SPLIT), 5, 10, 9, dtype=torch.float64)
    return layer, x, grad


def worker(rank: int, out_dir: str, init_file: str, stats_every: int, matrix_grad: bool, norm_type: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    layer, x, grad = make_inputs(stats_every, matrix_grad, norm_type)
    lo = sum(SPLIT[:rank])
    xl = x[lo: lo + SPLIT[rank]].clone().requires_grad_()
    for _ in range(2):  # two steps: running statistics accumulate (stats_every=2: the second one rescales)
        xl.grad = None
        y = layer(xl)
        y.backward(grad[lo: lo + SPLIT[rank]])
    save_and_exit(rank, out_dir, {"y": y.detach(), "grad_x": xl.grad, "running_mean": layer.running_mean,
                                  "running_deconv": layer.running_deconv, "grad_weight": layer.weight.grad})


def save_and_exit(rank: int, out_dir: str, results: dict) -> None:
    """Write this rank's results to ``out_dir/rank<k>.pt``, leave the group and end the process."""
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo can abort in interpreter teardown; nothing is left to do


def run_two_ranks(script: str, out_dir: Path, *args: str) -> list[dict]:
    """Run a worker script (it spawns two gloo ranks) and return each rank's saved results."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    worker = Path(__file__).with_name(script)
    proc = subprocess.run([sys.executable, str(worker), str(out_dir), *args], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


def assert_ranks_match_one_process(ranks: list[dict], values: dict, input_grads: dict, buffers: dict,
                                   param_grads: dict) -> None:
    """Two ranks' saved results against one process on the whole batch: per-sample ``values`` and
    ``input_grads`` concatenated over the ranks, ``buffers`` equal on every rank, and ``param_grads`` the sum
    of the ranks' shares (DDP sums them). Keys are the names the worker saved."""
    first = next(iter(values))
    assert ranks[0][first].shape[0] != ranks[1][first].shape[0]  # an unequal split: counts must be weighted
    for key, full in values.items():
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]), full, rtol=1e-10, atol=1e-10, msg=key)
    for key, full in input_grads.items():
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]), full, rtol=1e-9, atol=1e-10, msg=key)
    for key, buf in buffers.items():
        for r in ranks:
            torch.testing.assert_close(r[key], buf, rtol=1e-10, atol=1e-12, msg=key)
    for key, grad in param_grads.items():
        torch.testing.assert_close(ranks[0][key] + ranks[1][key], grad, rtol=1e-9, atol=1e-10, msg=key)


if __name__ == "__main__":
    out_dir = sys.argv[1]
    stats_every = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    matrix_grad = sys.argv[3] != "false" if len(sys.argv) > 3 else True
    norm_type = sys.argv[4] if len(sys.argv) > 4 else "none"
    mp.spawn(worker, args=(out_dir, os.path.join(out_dir, "init"), stats_every, matrix_grad, norm_type), nprocs=2,
             join=True)
