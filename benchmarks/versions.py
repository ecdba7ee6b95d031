"""Two versions of the code side by side in one process: this checkout's ``seg`` against another commit's.

    git worktree add /tmp/prev <commit>
    python benchmarks/versions.py --prev /tmp/prev [--layers "3x3 256->256" ...] [--layer-size 4 64 128]
                                  [--models deeplabv3:16 fcn:8 ...] [--model-sizes 2x256x512 8x480x480 ...]
                                  [--repeats 5] [--warmup 1] [--threads 2] [--no-counts] [--output PATH]
                                  [--check-args]

Times, with the repetitions interleaved (alternating the order, so that machine noise hits every variant alike):

* each of ``--layers`` (the geometries of ``deconv_layer.py``) on ``--layer-size`` (N H W): Conv2d + BatchNorm2d
  (this checkout), ``FastDeconv`` of the other commit, ``FastDeconv`` of this checkout, training step (forward and
  backward);
* each whole model of ``--models`` (``arch:output_stride``, ResNet-50) at each of ``--model-sizes``, SGD training
  step: BN (this checkout), deconvolution of the other commit, deconvolution of this checkout (both without
  BatchNorm: ``DeconvConfig()``, as the "Cost against workload" table);

and counts the aten operations and host syncs of one step of each. Both versions get the same seed, weights
and inputs. Prints one markdown table per workload and a summary; ``--output PATH`` writes PATH.md and PATH.json
after every workload, so a long run keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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
from deconv_layer import LAYERS  # noqa: E402
from machine_info import cpu_model  # noqa: E402
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


def layer_steps(mods: dict[str, dict[str, ModuleType]], name: str, size: list[int]) -> dict:
    c_in, c_out, k, s, p = LAYERS[name]
    n, h, w = size
    x = torch.randn(n, c_in, h, w, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    conv_bn = nn.Sequential(nn.Conv2d(c_in, c_out, k, s, p, bias=False), nn.BatchNorm2d(c_out)).train()
    out_shape = conv_bn(x).shape
    grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(2))
    layers = {"Conv+BN": conv_bn}
    for version, m in mods.items():
        torch.manual_seed(0)
        # the stem takes 15 Newton–Schulz iterations, as in the models (and deconv_layer.py)
        layers[f"deconv {version}"] = m["nn"].FastDeconv(c_in, c_out, k, s, p, n_iter=15 if c_in == 3 else 5).train()

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


def measure(steps: dict, warmup: int, repeats: int, count: bool = True) -> dict:
    samples = interleaved_samples(steps, torch.device("cpu"), warmup, repeats)
    counts = {k: ("–", "–") for k in steps}  # the counts do not depend on the workload's size: optional
    for k, fn in steps.items() if count else ():
        with OpCounter() as counter:
            fn()
        counts[k] = (counter.ops, counter.syncs)
    out = {"samples": samples, "median": {k: statistics.median(v) for k, v in samples.items()}, "counts": counts}
    if "deconv new" in samples and "deconv old" in samples:
        paired = [a / b for a, b in zip(samples["deconv new"], samples["deconv old"])]
        out["new_over_old"] = out["median"]["deconv new"] / out["median"]["deconv old"]
        out["new_over_old_min"], out["new_over_old_max"] = min(paired), max(paired)
    return out


def table(title: str, result: dict, base: str) -> str:
    med, counts = result["median"], result["counts"]
    lines = [f"\n{title}\n", "| variant | median (s) | ratio to " + base + " | new / old (paired min–max) "
             "| aten ops | host syncs |", "|---|---|---|---|---|---|"]
    for k in med:
        paired = ""
        if k == "deconv new" and "new_over_old" in result:
            lo, hi = result["new_over_old_min"], result["new_over_old_max"]
            paired = f"{result['new_over_old']:.3f}x ({lo:.3f}–{hi:.3f})"
        lines.append(f"| {k} | {med[k]:.3f} | {med[k] / med[base]:.2f}x | {paired} | {counts[k][0]} | "
                     f"{counts[k][1]} |")
    return "\n".join(lines)


def summary(results: dict) -> str:
    """One row per workload: the base's time, old and new deconvolution against it, and new against old."""
    lines = ["\n| workload | base (s) | old / base | new / base | **new / old** (paired min–max) "
             "| aten ops old → new |", "|---|---|---|---|---|---|"]
    for name, r in results["workloads"].items():
        base = "Conv+BN" if "Conv+BN" in r["median"] else "BN"
        med, counts = r["median"], r["counts"]
        lines.append(f"| {name} | {med[base]:.3f} | {med['deconv old'] / med[base]:.2f}x | "
                     f"{med['deconv new'] / med[base]:.2f}x | **{r['new_over_old']:.2f}x** "
                     f"({r['new_over_old_min']:.2f}–{r['new_over_old_max']:.2f}) | "
                     f"{counts['deconv old'][0]} → {counts['deconv new'][0]} |")
    return "\n".join(lines)


def _size(text: str) -> list[int]:
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected BxHxW with positive integers (e.g. 2x256x512), got {text!r}")
    return parts


def _model(text: str) -> tuple[str, int]:
    arch, _, stride = text.partition(":")
    if arch not in ("deeplabv3", "fcn") or stride not in ("8", "16"):
        raise argparse.ArgumentTypeError(f"expected ARCH:OS with ARCH deeplabv3 or fcn and OS 8 or 16, got {text!r}")
    return arch, int(stride)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prev", type=Path, required=True, help="a checkout of the other commit (git worktree)")
    parser.add_argument("--layers", nargs="*", default=["3x3 256->256"], choices=list(LAYERS), metavar="LAYER",
                        help="one-layer workloads, any of: " + ", ".join(LAYERS))
    parser.add_argument("--layer-size", type=int, nargs=3, default=[4, 64, 128], metavar=("N", "H", "W"))
    parser.add_argument("--models", nargs="*", type=_model, default=[("deeplabv3", 16)], metavar="ARCH:OS")
    parser.add_argument("--model-sizes", nargs="*", type=_size, default=[[2, 256, 512]], metavar="BxHxW")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-counts", action="store_true",
                        help="skip counting aten operations (one more step of each variant, under a dispatch mode)")
    parser.add_argument("--output", type=Path, help="write PATH.md and PATH.json (after every workload)")
    parser.add_argument("--check-args", action="store_true", help="print the workloads (JSON) and exit")
    args = parser.parse_args(argv)
    if not (args.prev / "seg" / "nn").is_dir():
        parser.error(f"--prev {args.prev}: no seg/nn there (make one with git worktree add)")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or min(args.layer_size) < 1:
        parser.error("--repeats and --threads must be at least 1, --warmup at least 0, --layer-size positive")
    layer_size = "×".join(map(str, args.layer_size))
    workloads = {f"{name} on {layer_size}×C": ("layer", name) for name in args.layers}
    for b, h, w in args.model_sizes:  # smallest first: a long run reports its quick rows early
        for arch, stride in args.models:
            workloads[f"{arch}-R50 OS {stride}, {b}×3×{h}×{w}"] = ("model", (arch, stride, [b, h, w]))
    if args.check_args:
        print(json.dumps({"prev": str(args.prev), "workloads": list(workloads), "counts": not args.no_counts},
                         ensure_ascii=False))
        return
    torch.set_num_threads(args.threads)
    mods = {"old": load_seg(args.prev), "new": load_seg(HERE.parent)}
    head = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu_model()}, {torch.get_num_threads()} "
            f"threads, torch={torch.__version__}, float32, old={args.prev}, warmup={args.warmup}, "
            f"repeats={args.repeats}, loadavg at start={os.getloadavg()[0]:.1f}")
    print(head, flush=True)
    results: dict = {"meta": head, "workloads": {}}
    out = [head]
    for name, (kind, spec) in workloads.items():
        if kind == "layer":
            steps, base = layer_steps(mods, spec, args.layer_size), "Conv+BN"
            title = f"One layer, {name}, training step (forward + backward)"
        else:
            steps, base = model_steps(mods, *spec), "BN"
            title = f"{name}, SGD training step"
        results["workloads"][name] = measure(steps, args.warmup, args.repeats, count=not args.no_counts)
        del steps
        gc.collect()
        out.append(table(title, results["workloads"][name], base))
        print(out[-1], flush=True)
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            text = "\n".join(out) + "\n" + summary(results) + f"\n\nloadavg now={os.getloadavg()[0]:.1f}\n"
            args.output.with_suffix(".md").write_text(text)
            args.output.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(summary(results))
    print(f"\nloadavg at end={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
