"""What the benchmark scripts share: device selection and interleaved, synchronised timing."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def select_device(parser: argparse.ArgumentParser, name: str, threads: int) -> tuple[torch.device, str]:
    """The device to time on and a description of it; ``--device cuda`` without CUDA is a usage error."""
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(threads)
    device = torch.device(name)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    return device, label


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, with queued GPU work finished before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved_samples(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                        repeats: int) -> dict[str, list[float]]:
    """Seconds per repetition of each function; each repetition runs all of them, in alternating order, so that
    machine noise hits every function alike (repetition ``r`` of one function pairs with repetition ``r`` of
    another)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeats):
        for key in keys if r % 2 == 0 else keys[::-1]:
            times[key].append(timed(fns[key], device))
    return times


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                repeats: int) -> dict[str, float]:
    """Median seconds per function over :func:`interleaved_samples`."""
    return {k: statistics.median(v) for k, v in interleaved_samples(fns, device, warmup, repeats).items()}


# Where deconvolution's time goes, by the autograd Functions of seg.nn (forward and backward events, each
# including the ops it runs): part name -> profiler event names.
DECONV_EVENTS = {
    "fold W·D": ("_InterleavedFold", "_InterleavedFoldBackward"),
    "sampling + covariance": ("_SampledMoments", "_SampledMomentsBackward"),
    "inverse sqrt": ("_IsqrtEigh", "_IsqrtEighBackward"),
}
DECONV_PARTS = tuple(DECONV_EVENTS)
BN_EVENTS = ("aten::native_batch_norm", "aten::native_batch_norm_backward")
CONV_EVENTS = ("aten::convolution", "aten::convolution_backward")


def profiled(step: Callable[[], object]) -> tuple[float, dict[str, float]]:
    """Wall seconds of one call under the CPU profiler and CPU seconds per event name (children included)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
    return wall, {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages()}


def deconv_parts(events: dict[str, float]) -> dict[str, float]:
    """Seconds of each of :data:`DECONV_PARTS` in one profiled step's events."""
    return {part: sum(events.get(n, 0.0) for n in names) for part, names in DECONV_EVENTS.items()}
