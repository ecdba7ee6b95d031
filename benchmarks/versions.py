"""Two versions of the code side by side in one process: this checkout's ``seg`` against another commit's.

    git worktree add /tmp/prev <commit>
    python benchmarks/versions.py --prev /tmp/prev [--layer-size 4 256 64 128] [--model-size 2 256 512]
                                  [--arch deeplabv3] [--os 16] [--repeats 5] [--threads 2] [--output PATH]

Times, with the repetitions interleaved (alternating the order, so that machine noise hits every variant alike):

* one layer, 3×3 256→256 on ``--layer-size``: Conv2d + BatchNorm2d (this checkout), ``FastDeconv`` of the other
  commit, ``FastDeconv`` of this checkout, training step (forward and backward);
* one whole model (``--arch``, ``--os``, ResNet-50, ``--model-size``), SGD training step: BN (this checkout),
  deconvolution of the other commit, deconvolution of this checkout;

and counts the aten operations and host syncs of one step of each. Both versions get the same seed, weights
and inputs. Prints a markdown table (``--output``: also writes it, with a JSON of every repetition).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import interleaved_samples  # noqa: E402
from train_step import OpCounter  # noqa: E402


def load_seg(root: Path) -> dict[str, ModuleType]:
    """``seg.nn``, ``seg.config`` and ``seg.models`` imported from ``root`` (the previous ``seg`` modules are
    dropped from ``sys.modules`` first; objects built from them keep working)."""
    for name in [k for k in sys.modules if k == "seg" or k.startswith("seg.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        import seg.config
        import seg.models
        import seg.nn
        return {"nn": seg.nn, "config": seg.config, "models": seg.models}
    finally:
        sys.path.remove(str(root))


def layer_steps(mods: dict[str, dict[str, ModuleType]], size: list[int]) -> dict:
    n, c, h, w = size
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(n, 256, h, w, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    conv_bn = nn.Sequential(nn.Conv2d(c, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256)).train()
    layers = {"Conv+BN": conv_bn}
    for version, m in mods.items():
        torch.manual_seed(0)
        layers[f"deconv {version}"] = m["nn"].FastDeconv(c, 256, 3, padding=1).train()

    def step(layer: nn.Module):
        def run() -> None:
            xi = x.clone().requires_grad_()
            layer(xi).backward(grad)
            layer.zero_grad(set_to_none=True)
        return run

    return {k: step(v) for k, v in layers.items()}


def model_steps(mods: dict[str, dict[str, ModuleType]], arch: str, output_stride: int, size: list[int]) -> dict:
    b, h, w = size
    gen = torch.Generator().manual_seed(1)
    x, target = torch.randn(b, 3, h, w, generator=gen), torch.randint(0, 19, (b, h, w), generator=gen)
    models = {}
    for version, m in mods.items():
        for norm in ("bn", "deconv") if version == "new" else ("deconv",):
            torch.manual_seed(0)
            cfg = m["config"].ModelConfig(arch=arch, encoder="resnet50", output_stride=output_stride, norm=norm,
                                          deconv=m["config"].DeconvConfig())
            models[f"{norm} {version}" if norm == "deconv" else "BN"] = m["models"].build_model(cfg).train()

    def step(model: nn.Module):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

        def run() -> None:
            loss = F.cross_entropy(model(x)["out"], target, ignore_index=255)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    return {k: step(v) for k, v in models.items()}


def measure(steps: dict, warmup: int, repeats: int) -> dict:
    samples = interleaved_samples(steps, torch.device("cpu"), warmup, repeats)
    counts = {}
    for k, fn in steps.items():
        with OpCounter() as counter:
            fn()
        counts[k] = (counter.ops, counter.syncs)
    return {"samples": samples, "median": {k: statistics.median(v) for k, v in samples.items()}, "counts": counts}


def table(title: str, result: dict, base: str) -> str:
    med, counts, samples = result["median"], result["counts"], result["samples"]
    lines = [f"\n{title}\n", "| variant | median (s) | ratio to " + base + " | new / old (paired min–max) "
             "| aten ops | host syncs |", "|---|---|---|---|---|---|"]
    for k in med:
        paired = ""
        if k.endswith(" new") and k.replace(" new", " old") in med:
            old = k.replace(" new", " old")
            ratios = [a / b for a, b in zip(samples[k], samples[old])]
            paired = f"{med[k] / med[old]:.3f}x ({min(ratios):.3f}–{max(ratios):.3f})"
        lines.append(f"| {k} | {med[k]:.3f} | {med[k] / med[base]:.2f}x | {paired} | {counts[k][0]} | "
                     f"{counts[k][1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prev", type=Path, required=True, help="a checkout of the other commit (git worktree)")
    parser.add_argument("--layer-size", type=int, nargs=4, default=[4, 256, 64, 128], metavar=("N", "C", "H", "W"))
    parser.add_argument("--model-size", type=int, nargs=3, default=[2, 256, 512], metavar=("B", "H", "W"))
    parser.add_argument("--arch", default="deeplabv3", choices=("deeplabv3", "fcn"))
    parser.add_argument("--os", type=int, default=16, choices=(8, 16))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--output", type=Path, help="write PATH.md and PATH.json")
    args = parser.parse_args()
    if not (args.prev / "seg" / "nn").is_dir():
        parser.error(f"--prev {args.prev}: no seg/nn there (make one with git worktree add)")
    torch.set_num_threads(args.threads)
    mods = {"old": load_seg(args.prev), "new": load_seg(HERE.parent)}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    head = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu}, {torch.get_num_threads()} threads, "
            f"torch={torch.__version__}, float32, old={args.prev}, repeats={args.repeats}, "
            f"loadavg at start={os.getloadavg()[0]:.1f}")
    print(head, flush=True)
    results = {"meta": head}
    out = [head]
    results["layer"] = measure(layer_steps(mods, args.layer_size), args.warmup, args.repeats)
    out.append(table(f"One layer, 3×3 {args.layer_size[1]}→256 on {'×'.join(map(str, args.layer_size))}, training "
                     f"step (forward + backward)", results["layer"], "Conv+BN"))
    print(out[-1], flush=True)
    if not args.skip_model:
        results["model"] = measure(model_steps(mods, args.arch, args.os, args.model_size), args.warmup, args.repeats)
        out.append(table(f"{args.arch}-ResNet50 OS {args.os}, {args.model_size[0]}×3×{args.model_size[1]}×"
                         f"{args.model_size[2]}, SGD training step", results["model"], "BN"))
        print(out[-1], flush=True)
    tail = f"\nloadavg at end={os.getloadavg()[0]:.1f}"
    print(tail)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".md").write_text("\n".join(out) + tail + "\n")
        args.output.with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
