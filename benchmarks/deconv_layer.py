"""One layer, side by side: Conv2d + BatchNorm2d against FastDeconv, training and eval, median times.

    python benchmarks/deconv_layer.py [--device cpu|cuda] [--threads 2] [--batch 4] [--size 64 128]
                                      [--repeats 9] [--layers "3x3 256->256" ...] [--breakdown]
                                      [--output benchmarks/results/deconv_layer_cpu] [--check-args]

Prints one row per layer geometry with the ratio FastDeconv / (Conv2d + BatchNorm2d) and the spread of the
per-repetition ratios; every row is measured in the same run, the two interleaved (alternating which goes
first) so that machine noise hits both alike. A training step is forward and backward (input and weight
gradients). ``--breakdown`` (CPU) profiles ``--repeats`` training steps of each and splits both into their
parts: the convolution (forward and backward) in each, BatchNorm, and deconvolution's patch sampling with the
covariance, inverse square root and fold ``W·D``; the rest is what no part accounts for (gradient
accumulation of the input, running statistics, allocation). ``--output PATH`` also writes ``PATH.md`` (the
tables, with date, machine and torch version) and ``PATH.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ``seg`` importable from any working directory

from common import (  # noqa: E402  (benchmarks/common.py)
    BN_EVENTS,
    CONV_EVENTS,
    deconv_parts,
    interleaved_samples,
    profiled,
    select_device,
)
from sweep_report import machine_description  # noqa: E402  (benchmarks/sweep_report.py)

from seg.nn import FastDeconv  # noqa: E402

# name: (in_channels, out_channels, kernel, stride, padding)
LAYERS = {
    "3x3 64->64": (64, 64, 3, 1, 1),
    "3x3 256->256": (256, 256, 3, 1, 1),
    "3x3 512->512": (512, 512, 3, 1, 1),
    "1x1 256->1024": (256, 1024, 1, 1, 0),
    "stem 7x7/2 3->64": (3, 64, 7, 2, 3),
}


def _steps(spec, batch: int, size: tuple[int, int], device: torch.device, method: str) -> dict:
    c_in, c_out, k, s, p = spec
    torch.manual_seed(0)
    conv_bn = nn.Sequential(nn.Conv2d(c_in, c_out, k, s, p, bias=False), nn.BatchNorm2d(c_out)).to(device)
    deconv = FastDeconv(c_in, c_out, k, s, p, n_iter=15 if c_in == 3 else 5, isqrt_method=method).to(device)
    x = torch.randn(batch, c_in, *size, device=device, requires_grad=True)

    def train_step(module):
        def run():
            module.train()
            x.grad = None
            y = module(x)
            y.backward(torch.ones_like(y))
        return run

    def eval_step(module):
        def run():
            module.eval()
            with torch.no_grad():
                module(x)
        return run

    return {"bn_train": train_step(conv_bn), "dc_train": train_step(deconv),
            "bn_eval": eval_step(conv_bn), "dc_eval": eval_step(deconv)}


def bench_layer(steps: dict, device: torch.device, repeats: int) -> dict:
    """Median seconds of each step and the deconv/BN ratios with the spread of the paired per-repetition ratios."""
    samples = interleaved_samples(steps, device, warmup=1, repeats=repeats)  # warm-up fills the eval fold cache
    out: dict = {k: statistics.median(v) for k, v in samples.items()}
    for kind in ("train", "eval"):
        paired = [a / b for a, b in zip(samples[f"dc_{kind}"], samples[f"bn_{kind}"])]
        out[f"{kind}_ratio"] = out[f"dc_{kind}"] / out[f"bn_{kind}"]
        out[f"{kind}_ratio_min"], out[f"{kind}_ratio_max"] = min(paired), max(paired)
    out["samples"] = samples
    return out


BREAKDOWN = ("conv", "BatchNorm", "sampling + covariance", "inverse sqrt", "fold W·D", "rest")


def breakdown(steps: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Median CPU seconds per part of a profiled training step and its median wall time ("step"), for each layer
    ("bn" and "deconv"); "rest" is the median step less the parts."""
    parts: dict[str, dict[str, list[float]]] = {"bn": {}, "deconv": {}}
    for r in range(repeats):
        for name in ("deconv", "bn") if r % 2 == 0 else ("bn", "deconv"):
            wall, events = profiled(steps["dc_train" if name == "deconv" else "bn_train"])
            found = {"conv": sum(events.get(e, 0.0) for e in CONV_EVENTS)}
            if name == "bn":
                found["BatchNorm"] = sum(events.get(e, 0.0) for e in BN_EVENTS)
            else:
                found.update(deconv_parts(events))
            found["step"] = wall
            for part, seconds in found.items():
                parts[name].setdefault(part, []).append(seconds)
    out = {name: {p: statistics.median(v) for p, v in d.items()} for name, d in parts.items()}
    for medians in out.values():  # the rest of the median step, so that the parts add up
        medians["rest"] = medians["step"] - sum(v for k, v in medians.items() if k != "step")
    return out


def result_table(header: str, rows: list[dict]) -> list[str]:
    lines = [header, "| layer | train conv+BN (ms) | train deconv (ms) | train ratio (spread) | eval conv+BN (ms) "
             "| eval deconv (ms) | eval ratio (spread) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["layer"]]
        for kind in ("train", "eval"):
            cells += [f"{r[f'bn_{kind}'] * 1e3:.1f}", f"{r[f'dc_{kind}'] * 1e3:.1f}",
                      f"{r[f'{kind}_ratio']:.2f}x ({r[f'{kind}_ratio_min']:.2f}–{r[f'{kind}_ratio_max']:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def breakdown_table(rows: list[dict], repeats: int) -> list[str]:
    lines = [f"\nProfiled training steps (median of {repeats}, milliseconds; the profiler adds some overhead). "
             "Share: of conv+BN's step.\n",
             "| layer | model | step | " + " | ".join(BREAKDOWN) + " |", "|---|---|---|" + "---|" * len(BREAKDOWN)]
    for r in rows:
        base = r["breakdown"]["bn"]["step"]
        for name in ("bn", "deconv"):
            b = r["breakdown"][name]
            cells = [f"{b[p] * 1e3:.1f} ({b[p] / base:.0%})" if p in b else "–" for p in BREAKDOWN]
            label = "conv+BN" if name == "bn" else "deconv"
            lines.append(f"| {r['layer']} | {label} | {b['step'] * 1e3:.1f} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=2, default=(64, 128), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--isqrt-method", default="auto", choices=("auto", "iterate", "eigh"))
    parser.add_argument("--layers", nargs="*", default=list(LAYERS), choices=list(LAYERS), metavar="LAYER",
                        help="subset of: " + ", ".join(LAYERS))
    parser.add_argument("--breakdown", action="store_true", help="profile the parts of each training step (CPU)")
    parser.add_argument("--output", type=Path, help="also write OUTPUT.md and OUTPUT.json")
    parser.add_argument("--check-args", action="store_true",
                        help="check the arguments, print what would run (JSON) and exit, touching no device")
    args = parser.parse_args()
    if args.repeats < 1 or args.batch < 1 or args.threads < 1 or min(args.size) < 1:
        parser.error("--repeats, --batch, --threads and --size must be at least 1")
    if args.breakdown and args.device != "cpu":
        parser.error("--breakdown profiles CPU time; run it with --device cpu")
    if args.check_args:
        print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                          if k != "check_args"}))
        return
    device, label = select_device(parser, args.device, args.threads)
    header = (f"{datetime.date.today()} · {machine_description(device)} · {label} · "
              f"input={args.batch}xCx{args.size[0]}x{args.size[1]} · isqrt={args.isqrt_method} · "
              f"torch={torch.__version__} · {args.repeats} repetitions after one warm-up\n")
    print("\n".join(result_table(header, [])), flush=True)
    rows = []
    for name in args.layers:
        steps = _steps(LAYERS[name], args.batch, tuple(args.size), device, args.isqrt_method)
        row = {"layer": name, **bench_layer(steps, device, args.repeats)}
        if args.breakdown:
            row["breakdown"] = breakdown(steps, args.repeats)
        rows.append(row)
        print(result_table("", [row])[-1], flush=True)
    lines = result_table(header, rows) + (breakdown_table(rows, args.repeats) if args.breakdown else [])
    if args.breakdown:
        print("\n".join(breakdown_table(rows, args.repeats)))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
        args.output.with_suffix(".json").write_text(json.dumps({"header": header.strip(), "rows": rows}, indent=1))
        print(f"wrote {args.output.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
