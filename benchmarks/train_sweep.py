"""Cost against workload size: the whole-model timings of ``benchmarks/train_step.py`` at several batch×H×W.

    python benchmarks/train_sweep.py [--sizes 2x256x512 4x480x480 8x480x480 ...] [--archs deeplabv3 fcn]
                                     [--output-strides 8 16] [--norm bn deconv gn iternorm] [--max-pixels N]
                                     [--max-memory-gib GIB] [--out-dir benchmarks/results] [--name NAME]

(``python benchmarks/train_step.py --sweep ...``, the older spelling, runs this.)

It times the models of ``benchmarks/train_step.py`` (the same ``--arch``, ``--os``, ``--norm``, ... and
measurements) at several workloads (``--sizes``, batch×H×W) and writes ``<out-dir>/<name>.md`` (tables: the
ratio to BN by workload, and every measurement with its spread over the repetitions; date, machine, torch
version), ``.json`` (every repetition) and ``.png`` (ratio
to BN against pixels per step, log x axis, one line per model, output stride and norm), rewritten after each
workload. A workload that does not fit (out of memory, more than ``--max-pixels``, or on CPU a peak RSS
extrapolated from the last workload above ``--max-memory-gib``) is recorded as "did not fit", as are the larger
workloads of the same model after it; the sweep goes on with the next model. ``--check-args`` validates the
arguments and prints what they resolve to without touching a device.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# Run as a script from the repository root or from benchmarks/: make ``seg`` and the siblings importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import select_device  # noqa: E402  (benchmarks/common.py)
from sweep_report import SweepReport, norm_results, point_record, run_meta, workload_label  # noqa: E402
from train_step import add_model_arguments, bench, check_model_arguments  # noqa: E402

# --sweep: workloads (batch, H, W) from the 2×256×512 to the paper's 8×480×480 and the config's 8×512×1024.
SWEEP_SIZES = ["2x256x512", "4x256x512", "4x480x480", "8x480x480", "8x512x1024"]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The share of the memory available at the start that a CPU sweep point may be predicted to take.
MEMORY_SHARE = 0.8


def parse_workload(text: str) -> tuple[int, int, int]:
    """``8x480x480`` -> (8, 480, 480): batch, height, width."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        values = tuple(int(v) for v in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not BATCHxHEIGHTxWIDTH with positive integers, e.g. 8x480x480")
    return values  # type: ignore[return-value]


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workloads and results")
    group.add_argument("--sizes", nargs="+", type=parse_workload, metavar="BxHxW",
                       help=f"workloads (batch x height x width); default {' '.join(SWEEP_SIZES)}")
    group.add_argument("--max-pixels", type=int, metavar="N",
                       help="record workloads of more than N pixels per step (batch·H·W) as 'did not fit'")
    group.add_argument("--max-memory-gib", type=float, metavar="GIB",
                       help="CPU: record a workload as 'did not fit' when its peak RSS, extrapolated from the "
                            "last one measured, exceeds GIB (default: 80%% of the memory available at the start)")
    group.add_argument("--out-dir", type=Path, help=f"where the sweep writes (default {RESULTS_DIR})")
    group.add_argument("--name", help="file name stem of the sweep's results (default train_step_sweep_<device>)")


def check_sweep(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.name is not None and (not args.name or "/" in args.name):
        parser.error(f"--name {args.name!r}: a file name stem without '/'")
    if args.max_pixels is not None and args.max_pixels < 1:
        parser.error("--max-pixels must be positive")
    args.sizes = sorted(args.sizes or [parse_workload(s) for s in SWEEP_SIZES], key=lambda w: w[0] * w[1] * w[2])
    args.out_dir = args.out_dir or RESULTS_DIR
    args.name = args.name or f"train_step_sweep_{args.device}"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_sweep_arguments(parser)
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    args.variant, args.breakdown = {}, False  # train_step.py's extras; the sweep times the norms only
    check_sweep(parser, args)
    return args, parser


def print_checked(args: argparse.Namespace) -> None:
    """``--check-args``: what the arguments resolved to, as JSON."""
    plan = {k: v for k, v in vars(args).items() if k not in ("check_args", "variant", "breakdown")}
    plan["sizes"] = [f"{b}x{h}x{w}" for b, h, w in args.sizes]
    plan["writes"] = [str(args.out_dir / f"{args.name}.{ext}") for ext in ("md", "json", "png")]
    print(json.dumps(plan, default=str))


class DidNotFit(Exception):
    """A workload that needs more memory than the machine has."""


def available_mib() -> float | None:
    """``MemAvailable`` of /proc/meminfo in MiB (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def predicted_peak_mib(last: dict, pixels: int) -> float | None:
    """The largest one-model peak RSS at ``pixels``, from the last workload measured (``last``: a sweep record
    that fit): what stays (peak less step) plus the step's memory scaled with the pixels."""
    peaks = [e["peak_mib"] - e["step_mib"] + e["step_mib"] * pixels / last["pixels"]
             for e in last["norms"].values() if "peak_mib" in e]
    return max(peaks) if peaks else None


def memory_guard(args: argparse.Namespace, device: torch.device, pixels: int, last: dict | None) -> str | None:
    """Why a workload is not tried (None: try it)."""
    if args.max_pixels is not None and pixels > args.max_pixels:
        return f"{pixels} pixels per step > --max-pixels {args.max_pixels}"
    if device.type != "cpu" or last is None or args.max_memory_gib is None:
        return None
    need = predicted_peak_mib(last, pixels)
    if need is not None and need > args.max_memory_gib * 1024:
        return (f"predicted peak RSS {need / 1024:.1f} GiB (from {last['pixels']} pixels) > memory guard "
                f"{args.max_memory_gib:.1f} GiB")
    return None


def is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_workload(arch: str, output_stride: int, workload: tuple[int, int, int], args: argparse.Namespace,
                   device: torch.device) -> dict:
    """:func:`bench` at one workload; running out of memory (here or in a memory subprocess) raises DidNotFit."""
    sized = argparse.Namespace(**{**vars(args), "batch": workload[0], "size": list(workload[1:])})
    try:
        return bench(arch, output_stride, sized, device)
    except subprocess.CalledProcessError as e:
        if e.returncode == -9 or is_out_of_memory(RuntimeError(e.stderr or "")):
            raise DidNotFit(f"the memory subprocess ran out of memory (exit {e.returncode})") from None
        tail = "\n".join((e.stderr or "").strip().splitlines()[-5:])
        raise RuntimeError(f"the memory subprocess failed (exit {e.returncode}):\n{tail}") from None
    except RuntimeError as e:
        if is_out_of_memory(e):
            raise DidNotFit(f"out of memory ({str(e).splitlines()[0][:120]})") from None
        raise


def sweep_point(arch: str, output_stride: int, workload: tuple[int, int, int], args: argparse.Namespace,
                device: torch.device, last: dict | None) -> dict:
    record = point_record(arch, args.encoder, output_stride, workload)
    record["reason"] = memory_guard(args, device, record["pixels"], last)
    if record["reason"] is not None:
        return record
    start = time.perf_counter()
    try:
        result = bench_workload(arch, output_stride, workload, args, device)
    except DidNotFit as e:
        record["reason"] = str(e)
    release(device)
    if record["reason"] is None:
        record.update(fit=True, norms=norm_results(result, args.norm))
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def describe_point(p: dict) -> str:
    head = f"{p['arch']} {p['encoder']} OS {p['output_stride']} {workload_label(p['batch'], p['height'], p['width'])}"
    if not p["fit"]:
        return f"{head}: did not fit: {p['reason']}"
    ratios = ", ".join(f"{n} {e['train_ratio']:.2f}x" for n, e in p["norms"].items() if "train_ratio" in e)
    return f"{head} ({p['seconds']} s): bn step {p['norms']['bn']['train_s']:.3f} s; train ratios {ratios}"


def sweep(args: argparse.Namespace, device: torch.device) -> SweepReport:
    """Every (arch, output stride), its workloads from the smallest up; once one does not fit, the larger ones of
    that model are recorded as not fitting either. The results are rewritten after every workload."""
    if device.type == "cpu" and args.memory and args.max_memory_gib is None:
        mib = available_mib()
        args.max_memory_gib = None if mib is None else MEMORY_SHARE * mib / 1024
    report = SweepReport(run_meta(args, device, torch.get_num_threads()), args.out_dir, args.name)
    for arch in args.arch:
        for output_stride in args.os:
            last, failed = None, None
            for workload in args.sizes:
                if failed is not None:
                    point = point_record(arch, args.encoder, output_stride, workload)
                    point["reason"] = f"a smaller workload ({failed}) did not fit"
                else:
                    point = sweep_point(arch, output_stride, workload, args, device, last)
                    if point["fit"]:
                        last = point
                    else:
                        failed = workload_label(*workload)
                report.add(point)
                report.write()
                print(describe_point(point), flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    args, parser = parse_args(argv)
    if args.check_args:
        print_checked(args)
        return
    device, name = select_device(parser, args.device, args.threads)
    print(f"device={device} ({name}) sweep over {' '.join(workload_label(*w) for w in args.sizes)} "
          f"norms={','.join(args.norm)} warmup={args.warmup} repeats={args.repeats} torch={torch.__version__} "
          f"loadavg={os.getloadavg()[0]:.2f}", flush=True)
    report = sweep(args, device)
    print("\n" + report.paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in report.paths.values()))


if __name__ == "__main__":
    main()
