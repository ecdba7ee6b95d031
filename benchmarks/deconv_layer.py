"""One layer, side by side: Conv2d + BatchNorm2d against FastDeconv, training and eval, median times.

    python benchmarks/deconv_layer.py [--device cpu|cuda] [--threads 2] [--batch 4] [--size 64 128]

Prints one row per layer geometry with the ratio FastDeconv / (Conv2d + BatchNorm2d); every row is
measured in the same run, interleaving the two so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from common import interleaved, select_device  # (benchmarks/common.py)

from seg.nn import FastDeconv

# name: (in_channels, out_channels, kernel, stride, padding)
LAYERS = {
    "3x3 64->64": (64, 64, 3, 1, 1),
    "3x3 256->256": (256, 256, 3, 1, 1),
    "3x3 512->512": (512, 512, 3, 1, 1),
    "1x1 256->1024": (256, 1024, 1, 1, 0),
    "stem 7x7/2 3->64": (3, 64, 7, 2, 3),
}


def bench_layer(spec, batch: int, size: tuple[int, int], device: torch.device, repeats: int, method: str):
    c_in, c_out, k, s, p = spec
    torch.manual_seed(0)
    conv_bn = nn.Sequential(nn.Conv2d(c_in, c_out, k, s, p, bias=False), nn.BatchNorm2d(c_out)).to(device)
    deconv = FastDeconv(c_in, c_out, k, s, p, n_iter=15 if c_in == 3 else 5, isqrt_method=method).to(device)
    x = torch.randn(batch, c_in, *size, device=device, requires_grad=True)

    def train_step(module):
        def run():
            module.train()
            y = module(x)
            y.backward(torch.ones_like(y))
        return run

    def eval_step(module):
        def run():
            module.eval()
            with torch.no_grad():
                module(x)
        return run

    steps = {"bn_train": train_step(conv_bn), "dc_train": train_step(deconv),
             "bn_eval": eval_step(conv_bn), "dc_eval": eval_step(deconv)}
    return interleaved(steps, device, warmup=1, repeats=repeats)  # one warm-up (and the eval fold cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=2, default=(64, 128), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--isqrt-method", default="auto", choices=("auto", "iterate", "eigh"))
    parser.add_argument("--layers", nargs="*", default=list(LAYERS), help="subset of: " + ", ".join(LAYERS))
    args = parser.parse_args()
    device, _ = select_device(parser, args.device, args.threads)
    print(f"device={device} threads={torch.get_num_threads()} input={args.batch}xCx{args.size[0]}x{args.size[1]} "
          f"isqrt={args.isqrt_method} torch={torch.__version__}")
    print("| layer | train conv+BN (ms) | train deconv (ms) | train ratio | eval conv+BN (ms) | eval deconv (ms) "
          "| eval ratio |\n|---|---|---|---|---|---|---|")
    for name in args.layers:
        t = bench_layer(LAYERS[name], args.batch, tuple(args.size), device, args.repeats, args.isqrt_method)
        print(f"| {name} | {t['bn_train'] * 1e3:.1f} | {t['dc_train'] * 1e3:.1f} | "
              f"{t['dc_train'] / t['bn_train']:.2f}x | {t['bn_eval'] * 1e3:.1f} | {t['dc_eval'] * 1e3:.1f} | "
              f"{t['dc_eval'] / t['bn_eval']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
