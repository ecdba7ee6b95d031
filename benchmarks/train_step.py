"""Whole models, side by side: ``norm: bn`` against ``norm: deconv`` (encoder and heads), train and eval.

    python benchmarks/train_step.py [--device cpu|cuda] [--arch deeplabv3 fcn] [--os 8 16] [--batch 2]
                                    [--size 128 256] [--threads 2] [--encoder resnet50] [--repeats 3]
                                    [--norm bn deconv gn iternorm channel_deconv none]
                                    [--variant stats_every=4 matrix_grad=false ...] [--breakdown]
    python benchmarks/train_step.py --sweep ...     # the same as benchmarks/train_sweep.py ...

For every (architecture, output stride) it builds the BN and the deconvolution model from the same seed and
prints the median time of

* a training step: forward, cross-entropy, backward, SGD step (bf16 autocast on CUDA);
* an eval forward under ``no_grad``: BN model; deconvolution model as it is (``FastDeconv`` in eval mode
  reuses its cached folded weight); deconvolution model after ``seg.nn.fold_deconv`` (plain convs);

each after warm-up, repetitions of BN and deconvolution interleaved (alternating which goes first) so that
machine noise hits both alike. Peak memory of a training step: on CUDA ``torch.cuda.max_memory_allocated``
above what the model and optimizer hold before the step; on CPU the peak resident set size (Linux ``VmHWM``, reset after
the build) of a fresh subprocess that builds one model and runs two training steps, and that peak above the
resident size just after the build (activations, gradients, optimizer state, allocator slack).

The deconvolution table also shows the aten operations one training step dispatches (``TorchDispatchMode``,
views included; independent of the input size) and its host synchronisations (``.item()``-like reads and
host-to-device tensor constructions), for BN and deconvolution (``--no-op-count`` skips the counting step).

``--norm`` chooses the ``model.norm`` values timed, all in the same interleaved repetitions (default: bn
deconv; bn, the baseline of every ratio, is always timed): with deconv, the table above; with any other
norm, a second table with one row per norm (training step, eval forward, memory, each with its ratio to bn).

``--variant`` also times deconvolution with other ``model.deconv`` settings (the speed options that change
the mathematics), per step averaged over a refresh cycle. ``--breakdown`` (CPU) profiles ``--repeats`` training
steps of each model and splits deconvolution's extra time into the fold ``W·D``, the patch sampling with the
covariance, and the inverse square root (forward and backward each), less the BN layers' own time, and the rest
(running statistics, bias, per-layer overhead).

``--sweep``: cost against workload size, :mod:`train_sweep` (``benchmarks/train_sweep.py``), which reuses
:func:`bench`. ``--check-args`` validates the arguments and prints what they resolve to without touching a device.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

# Run as a script from the repository root or from benchmarks/: make ``seg`` importable either way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402  (benchmarks/common.py)
    BN_EVENTS,
    DECONV_PARTS,
    deconv_parts,
    interleaved_samples,
    profiled,
    select_device,
    sync,
)

import seg.tasks  # noqa: E402, F401  (importing it registers every task's config rules)
from seg.config import ConfigError, DeconvConfig, ModelConfig, from_dict, load_config, parse_override  # noqa: E402
from seg.models import build_model  # noqa: E402
from seg.nn import FastDeconv, fold_deconv  # noqa: E402

# Every model.norm choice, in the config's order.
NORM_CHOICES: tuple[str, ...] = next(f for f in dataclasses.fields(ModelConfig) if f.name == "norm").metadata["choices"]
DEFAULT_NORMS = ["bn", "deconv"]
# The deconvolution model of the Cityscapes configs (the paper's ND model: BatchNorm kept after each 1×1 shortcut
# conv), read from the config so that the benchmark cannot drift from what users train.
BENCHMARK_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "deeplab_deconv.yaml"


def default_keep_bn() -> list[str]:
    return list(load_config(BENCHMARK_CONFIG).model.deconv.keep_bn)


def parse_variant(text: str) -> DeconvConfig:
    """``stats_every=4,matrix_grad=false`` -> the ``model.deconv`` section with those keys changed."""
    data = {}
    for part in text.split(","):
        key, value = parse_override(part)
        data[".".join(key)] = value
    return from_dict({"model": {"deconv": data}}, source=f"--variant {text}").model.deconv


def make_model(arch: str, encoder: str, output_stride: int, norm: str, isqrt_method: str,
               device: torch.device, deconv: DeconvConfig | None = None, keep_bn: list[str] | None = None
               ) -> nn.Module:
    """``keep_bn``: the BatchNorm layers a deconvolution model keeps (``model.deconv.keep_bn``; None: none)."""
    torch.manual_seed(0)  # both norms start from the same conv weights
    deconv = dataclasses.replace(deconv or DeconvConfig(), keep_bn=list(keep_bn or []))
    cfg = ModelConfig(arch=arch, encoder=encoder, output_stride=output_stride, norm=norm, deconv=deconv)
    model = build_model(cfg)
    if isqrt_method != "auto":
        for m in model.modules():
            if isinstance(m, FastDeconv):
                m.isqrt_method = isqrt_method
    return model.to(device)


class TrainStep:
    """One SGD training step of a model on a fixed batch (so every repetition does the same work)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, device: torch.device):
        self.model, self.x, self.target, self.device = model, x, target, device
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def __call__(self) -> None:
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = F.cross_entropy(self.model(self.x)["out"], self.target, ignore_index=255)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def eval_forward(model: nn.Module, x: torch.Tensor, device: torch.device):
    model.eval()

    def run() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            model(x)

    return run


def proc_status_mib(key: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (resident peak) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {key} line")


def memory_probe(spec: dict) -> dict:
    """In a fresh process: build one model, note the RSS, run two training steps, report the peak RSS.

    The peak is reset after the build (``5`` to /proc/self/clear_refs), so imports and construction,
    which can exceed a small model's step, do not count.
    """
    torch.set_num_threads(spec["threads"])
    device = torch.device("cpu")
    model = make_model(spec["arch"], spec["encoder"], spec["os"], spec["norm"], spec["isqrt_method"], device,
                       keep_bn=spec["keep_bn"])
    x, target = batch_of(spec["batch"], spec["size"], device)
    step = TrainStep(model, x, target, device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = proc_status_mib("VmRSS")
    step()
    step()
    peak = proc_status_mib("VmHWM")
    return {"peak_mib": peak, "step_mib": peak - base}


def cpu_memory(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-probe", json.dumps(spec)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# Where deconvolution's time goes: its autograd Functions, forward and backward (each including the ops
# it runs), and what BN costs in the BN model (time the deconvolution model does not spend).
PARTS = (*DECONV_PARTS, "BN layers (BN model)")


def breakdown(deconv_step, bn_step, repeats: int) -> dict[str, float]:
    """Median wall time of a profiled step of each model (alternating which goes first) and the median
    seconds per part; BN's own time is what the deconvolution model saves, shown negative so the parts add up."""
    walls: dict[str, list[float]] = {"deconv": [], "bn": []}
    parts: dict[str, list[float]] = {p: [] for p in PARTS}
    for r in range(repeats):
        for name in ("deconv", "bn") if r % 2 == 0 else ("bn", "deconv"):
            wall, events = profiled(deconv_step if name == "deconv" else bn_step)
            walls[name].append(wall)
            if name == "bn":
                parts["BN layers (BN model)"].append(-sum(events.get(n, 0.0) for n in BN_EVENTS))
                continue
            for part, seconds in deconv_parts(events).items():
                parts[part].append(seconds)
    out = {f"prof_{k}": statistics.median(v) for k, v in walls.items()}
    out.update({f"prof_{p}": statistics.median(v) for p, v in parts.items()})
    return out


# Operations that make the host wait for the device (or copy host data to it) when they run on a GPU.
SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.lift_fresh")


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while active (views included) and the host synchronisations."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.syncs += str(func.overloadpacket) in SYNC_OPS
        return func(*args, **(kwargs or {}))


def op_counts(steps: dict[str, object], norms: list[str]) -> dict[str, int]:
    """``ops_<norm>``, ``syncs_<norm>``: aten operations and host syncs of one training step of each model
    (forward, loss, backward, SGD step), counted after the timed (warm) steps. Counts do not depend on the input
    size; on a GPU every non-view operation is a kernel launch."""
    out = {}
    for n in norms:
        with OpCounter() as counter:
            steps[n]()
        out[f"ops_{n}"], out[f"syncs_{n}"] = counter.ops, counter.syncs
    return out


def cuda_memory(step: TrainStep, device: torch.device) -> dict:
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mib": peak / 2**20, "step_mib": (peak - base) / 2**20}


def batch_of(batch: int, size: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, *size, generator=gen).to(device)
    target = torch.randint(0, 19, (batch, *size), generator=gen).to(device)
    return x, target


def timings(fns: dict, device: torch.device, warmup: int, repeats: int, samples: dict[str, list[float]],
            prefix: str = "") -> dict[str, float]:
    """Median seconds of interleaved repetitions, keys prefixed; the per-repetition seconds go into ``samples``."""
    runs = {f"{prefix}{k}": v for k, v in interleaved_samples(fns, device, warmup, repeats).items()}
    samples.update(runs)
    return {k: statistics.median(v) for k, v in runs.items()}


def train_steps(arch: str, output_stride: int, args: argparse.Namespace, device: torch.device, x: torch.Tensor,
                target: torch.Tensor) -> tuple[dict[str, nn.Module], dict[str, object]]:
    """The model of every norm and a training step of each (and of each deconvolution variant, per refresh cycle)."""
    models = {n: make_model(arch, args.encoder, output_stride, n, args.isqrt_method, device, keep_bn=args.keep_bn)
              for n in args.norm}
    steps: dict[str, object] = {n: TrainStep(models[n], x, target, device) for n in args.norm}
    for name, deconv in args.variant.items():
        # A variant's cost is the mean over one refresh cycle: stats_every consecutive steps, timed together.
        variant = TrainStep(make_model(arch, args.encoder, output_stride, "deconv", args.isqrt_method, device,
                                       deconv, args.keep_bn), x, target, device)
        steps[name] = lambda variant=variant, k=deconv.stats_every: [variant() for _ in range(k)]
    return models, steps


def step_memory(arch: str, output_stride: int, args: argparse.Namespace, device: torch.device,
                steps: dict[str, object]) -> dict[str, float]:
    """Peak memory of a training step per norm (CUDA: in this process; CPU: a fresh subprocess per model)."""
    mem = {}
    for n in args.norm:
        if device.type == "cuda":
            result = cuda_memory(steps[n], device)
        elif args.memory:
            spec = dict(arch=arch, encoder=args.encoder, os=output_stride, norm=n, batch=args.batch,
                        size=list(args.size), threads=args.threads, isqrt_method=args.isqrt_method,
                        keep_bn=args.keep_bn)
            result = cpu_memory(spec)
        else:
            continue
        mem.update({f"{k}_{n}": v for k, v in result.items()})
    return mem


def bench(arch: str, output_stride: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Median seconds (``train_<norm>``, ``eval_<norm>``, ``eval_folded``, variants), memory
    (``peak_mib_<norm>``, ``step_mib_<norm>``), profiled parts with ``--breakdown``, and ``samples``: the seconds
    of every repetition under the same keys."""
    x, target = batch_of(args.batch, args.size, device)
    models, steps = train_steps(arch, output_stride, args, device, x, target)
    samples: dict[str, list[float]] = {}
    t = timings(steps, device, args.warmup, args.repeats, samples, prefix="train_")
    for name, deconv in args.variant.items():
        t[f"train_{name}"] /= deconv.stats_every
        samples[f"train_{name}"] = [v / deconv.stats_every for v in samples[f"train_{name}"]]
    if args.breakdown:
        t.update(breakdown(steps["deconv"], steps["bn"], args.repeats))
    if args.op_count:
        t.update(op_counts(steps, args.norm))
    mem = step_memory(arch, output_stride, args, device, steps)
    evals = {f"eval_{n}": eval_forward(models[n], x, device) for n in args.norm}
    if "deconv" in models:
        evals["eval_folded"] = eval_forward(fold_deconv(copy.deepcopy(models["deconv"])), x, device)
    t.update(timings(evals, device, args.warmup, args.repeats, samples))
    return {**t, **mem, "samples": samples}


def deconv_header(mem_what: str) -> str:
    return (f"| model | OS | train BN (s) | train deconv (s) | train ratio | eval BN (s) | eval deconv cached (s) "
            f"| eval deconv folded (s) | eval ratio cached / folded | memory BN ({mem_what}) | memory deconv "
            f"| memory ratio | aten ops BN | aten ops deconv | ops ratio | host syncs BN / deconv "
            f"|\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def deconv_row(model: str, output_stride: int, r: dict[str, float]) -> str:
    """bn against deconv: train, eval (cached and folded), memory, with the ratios."""
    row = (f"| {model} | {output_stride} | {r['train_bn']:.3f} | {r['train_deconv']:.3f} | "
           f"{r['train_deconv'] / r['train_bn']:.2f}x | {r['eval_bn']:.3f} | {r['eval_deconv']:.3f} | "
           f"{r['eval_folded']:.3f} | {r['eval_deconv'] / r['eval_bn']:.2f}x / "
           f"{r['eval_folded'] / r['eval_bn']:.2f}x | ")
    if "peak_mib_bn" not in r:
        row += "- | - | - | "
    else:
        row += (f"{r['peak_mib_bn']:.0f} / {r['step_mib_bn']:.0f} | "
                f"{r['peak_mib_deconv']:.0f} / {r['step_mib_deconv']:.0f} | "
                f"{r['peak_mib_deconv'] / r['peak_mib_bn']:.2f}x / "
                f"{r['step_mib_deconv'] / r['step_mib_bn']:.2f}x | ")
    if "ops_bn" not in r:
        return row + "- | - | - | - |"
    return row + (f"{r['ops_bn']} | {r['ops_deconv']} | {r['ops_deconv'] / r['ops_bn']:.2f}x | "
                  f"{r['syncs_bn']} / {r['syncs_deconv']} |")


def print_norm_table(results: list[tuple[str, int, dict]], norms: list[str], mem_what: str) -> None:
    """One row per (model, output stride, norm): training step, eval forward (deconv: cached in eval mode)
    and memory, each with its ratio to bn."""
    print(f"\n| model | OS | norm | train (s) | train ratio to BN | eval (s) | eval ratio to BN "
          f"| memory ({mem_what}) | memory ratio to BN |\n|---|---|---|---|---|---|---|---|---|")
    for model, output_stride, r in results:
        for n in norms:
            train, evl = r[f"train_{n}"], r[f"eval_{n}"]
            row = (f"| {model} | {output_stride} | {n} | {train:.3f} | {train / r['train_bn']:.2f}x | "
                   f"{evl:.3f} | {evl / r['eval_bn']:.2f}x | ")
            if f"peak_mib_{n}" in r:
                peak, step = r[f"peak_mib_{n}"], r[f"step_mib_{n}"]
                row += f"{peak:.0f} / {step:.0f} | {peak / r['peak_mib_bn']:.2f}x / {step / r['step_mib_bn']:.2f}x |"
            else:
                row += "- | - |"
            print(row)


def print_variants(results: list[tuple[str, int, dict]], variants: list[str]) -> None:
    print("\n| model | OS | model.deconv | train deconv (s per step, mean over a refresh cycle) "
          "| train ratio to BN |\n|---|---|---|---|---|")
    for model, output_stride, r in results:
        for v in variants:
            sec = r[f"train_{v}"]
            print(f"| {model} | {output_stride} | {v} | {sec:.3f} | {sec / r['train_bn']:.2f}x |")


def print_breakdowns(results: list[tuple[str, int, dict]], repeats: int) -> None:
    print(f"\nProfiled training steps (median of {repeats} per model, CPU seconds; the profiler adds some "
          "overhead to both models):\n")
    print("| model | OS | step BN | step deconv | extra | " + " | ".join(PARTS) + " | rest of the extra |\n"
          "|---|---|---|---|---|" + "---|" * (len(PARTS) + 1))
    for model, output_stride, r in results:
        extra = r["prof_deconv"] - r["prof_bn"]
        parts = [r[f"prof_{p}"] for p in PARTS]
        cells = " | ".join(f"{v:.3f} ({v / extra:.0%})" for v in parts)
        print(f"| {model} | {output_stride} | {r['prof_bn']:.3f} | {r['prof_deconv']:.3f} | "
              f"{extra:.3f} | {cells} | {extra - sum(parts):.3f} ({(extra - sum(parts)) / extra:.0%}) |")


def check_encoder(parser: argparse.ArgumentParser, encoder: str) -> None:
    from seg.models.build import _check_encoder  # the builder's own check (smp or tu-<timm> names)

    try:
        _check_encoder(encoder)
    except ConfigError as e:
        parser.error(f"--encoder: {e}")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The models and measurements, shared with ``train_sweep.py``."""
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--arch", "--archs", dest="arch", nargs="+", default=["deeplabv3", "fcn"],
                        choices=("deeplabv3", "deeplabv3plus", "fcn"))
    parser.add_argument("--os", "--output-strides", dest="os", nargs="+", type=int, default=[8, 16], choices=(8, 16),
                        help="output strides")
    parser.add_argument("--encoder", default="resnet50")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--isqrt-method", default="auto", choices=("auto", "iterate", "eigh"))
    parser.add_argument("--keep-bn", nargs="*", metavar="PATTERN", default=None,
                        help="BatchNorm layers the deconvolution model keeps (model.deconv.keep_bn); default: those "
                             f"of {BENCHMARK_CONFIG.name} (after each 1x1 shortcut conv, as the paper's model); "
                             "--keep-bn with no pattern: none")
    parser.add_argument("--norm", nargs="+", default=DEFAULT_NORMS, choices=NORM_CHOICES,
                        help="model.norm values to time side by side (bn, the baseline, is always timed)")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="CPU: skip the peak-memory subprocesses")
    parser.add_argument("--no-op-count", dest="op_count", action="store_false",
                        help="skip counting the aten operations and host syncs of one training step per model")
    parser.add_argument("--check-args", action="store_true",
                        help="check the arguments, print what would run (JSON) and exit, touching no device")


def check_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be positive, --warmup at least 0")
    # bn first: the baseline of every ratio; each norm once.
    args.norm = list(dict.fromkeys(["bn", *args.norm]))
    if args.keep_bn is None:
        args.keep_bn = default_keep_bn()
    check_encoder(parser, args.encoder)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=[128, 256], metavar=("H", "W"))
    parser.add_argument("--variant", nargs="*", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="also time deconvolution with these model.deconv settings, e.g. stats_every=4 "
                             "matrix_grad=false (speed options that change the mathematics)")
    parser.add_argument("--breakdown", action="store_true",
                        help="CPU: profile --repeats training steps of each model and print where "
                             "deconvolution's extra time goes")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        return args, parser
    try:
        args.variant = {text: parse_variant(text) for text in args.variant}
    except ConfigError as e:
        parser.error(str(e))
    if args.batch < 1 or min(args.size) < 1:
        parser.error("--batch and --size must be positive")
    if args.breakdown and args.device != "cpu":
        parser.error("--breakdown profiles CPU time; run it with --device cpu")
    check_model_arguments(parser, args)
    if args.breakdown and "deconv" not in args.norm:
        parser.error("--breakdown splits deconvolution's extra time; add deconv to --norm")
    return args, parser


def print_checked(args: argparse.Namespace) -> None:
    """``--check-args``: what the arguments resolved to, as JSON."""
    plan = {k: v for k, v in vars(args).items() if k not in ("memory_probe", "check_args")}
    plan["variant"] = list(args.variant)
    print(json.dumps(plan, default=str))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--sweep" in argv:  # the older spelling of train_sweep.py (which imports this module: imported here)
        import train_sweep

        train_sweep.main([a for a in argv if a != "--sweep"])
        return
    args, parser = parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(json.loads(args.memory_probe))))
        return
    if args.check_args:
        print_checked(args)
        return
    device, name = select_device(parser, args.device, args.threads)
    print(f"device={device} ({name}) encoder={args.encoder} input={args.batch}x3x{args.size[0]}x{args.size[1]} "
          f"norms={','.join(args.norm)} keep_bn={args.keep_bn} isqrt={args.isqrt_method} warmup={args.warmup} "
          f"repeats={args.repeats} "
          f"torch={torch.__version__} loadavg={os.getloadavg()[0]:.2f}", flush=True)
    mem_what = "step peak above model, MiB" if device.type == "cuda" else "peak RSS / above build, MiB"
    if "deconv" in args.norm:
        print(deconv_header(mem_what), flush=True)
    results = []
    for arch in args.arch:
        for output_stride in args.os:
            r = bench(arch, output_stride, args, device)
            results.append((f"{arch} {args.encoder}", output_stride, r))
            # Rows come as each model finishes: a long run shows progress.
            print(deconv_row(*results[-1]) if "deconv" in args.norm else f"{arch} OS {output_stride}: done",
                  flush=True)
    if set(args.norm) - set(DEFAULT_NORMS):
        print_norm_table(results, args.norm, mem_what)
    if args.variant:
        print_variants(results, list(args.variant))
    if args.breakdown:
        print_breakdowns(results, args.repeats)
    print(f"loadavg at end={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
