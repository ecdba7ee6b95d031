"""The training step under the engine's layout and compiler options (``train.channels_last``, ``train.compile``):
eager NCHW against channels_last, torch.compile, and both, for ``norm: bn`` and ``norm: deconv``.

    python benchmarks/train_options.py [--device cpu|cuda] [--encoder resnet18] [--os 16] [--batch 2]
                                       [--size 128 256] [--norm bn deconv] [--options eager channels_last compile]
                                       [--warmup 2] [--repeats 5] [--threads 2]

One step: forward, cross-entropy, backward, SGD step (bf16 autocast on CUDA), as ``seg.engine.trainer.train_step``
runs it with those options (model and input in channels_last memory format; ``torch.compile`` of the model,
mode ``default``). Every (norm, option) model starts from the same weights; repetitions are interleaved. The
first compiled call (compilation) is reported apart and left out of the timing (warm-up). Prints a markdown table:
median seconds per step and the ratio to eager for each norm, and the compile time.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_samples, select_device, sync  # noqa: E402

from seg.config import ModelConfig  # noqa: E402
from seg.models import build_model  # noqa: E402

OPTIONS = ("eager", "channels_last", "compile", "compile+channels_last")


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x)["out"].float(), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def build(args: argparse.Namespace, norm: str, option: str, base: torch.nn.Module, x: torch.Tensor,
          y: torch.Tensor, device: torch.device) -> tuple[object, float | None]:
    model = copy.deepcopy(base).to(device).train()
    if "channels_last" in option:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    compile_s = None
    if "compile" in option:
        model = torch.compile(model)
    fn = step_fn(model, x, y, device)
    if "compile" in option:
        t0 = time.perf_counter()
        fn()
        sync(device)
        compile_s = time.perf_counter() - t0
    return fn, compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--arch", default="deeplabv3")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--os", type=int, default=16, choices=(8, 16))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=[128, 256], metavar=("H", "W"))
    parser.add_argument("--norm", nargs="+", default=["bn", "deconv"])
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    device, name = select_device(parser, args.device, args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, *args.size, generator=g).to(device)
    y = torch.randint(0, 19, (args.batch, *args.size), generator=g).to(device)
    fns, compile_s = {}, {}
    for norm in args.norm:
        torch.manual_seed(0)
        base = build_model(ModelConfig(arch=args.arch, encoder=args.encoder, output_stride=args.os, norm=norm))
        for option in args.options:
            fns[f"{norm} {option}"], compile_s[f"{norm} {option}"] = build(args, norm, option, base, x, y, device)
    samples = interleaved_samples(fns, device, args.warmup, args.repeats)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"device={device} ({name}) torch {torch.__version__} {args.arch} {args.encoder} OS {args.os} "
          f"batch {args.batch}x3x{args.size[0]}x{args.size[1]}, warm-up {args.warmup}, {args.repeats} repetitions")
    print("| norm | option | step (s, median) | min-max (s) | vs eager | first call (compile, s) |")
    print("|---|---|---|---|---|---|")
    for key, t in med.items():
        norm, option = key.split(" ", 1)
        eager = med.get(f"{norm} eager")
        ratio = f"{t / eager:.2f}x" if eager else "-"
        first = f"{compile_s[key]:.1f}" if compile_s[key] is not None else "-"
        print(f"| {norm} | {option} | {t:.3f} | {min(samples[key]):.3f}-{max(samples[key]):.3f} | {ratio} | "
              f"{first} |")
    print(f"loadavg at end={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
