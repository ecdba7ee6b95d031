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
