"""What a run reports. The loop builds one :class:`~seg.events.Event` per log point; each writer takes its part of it.

- :class:`ConsoleWriter`: the event's line (and the progress bar's figures),
- :class:`JsonlWriter`: ``metrics.jsonl``, the machine-readable history of the run,
- :class:`TensorBoardWriter`: scalars and images under fixed tags.

Only rank 0 writes: other ranks get no writers.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from seg.events import Event


class Writer(Protocol):
    def write(self, event: Event) -> None: ...

    def close(self) -> None: ...


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    """Peak allocated CUDA memory, or on CPU the process's peak resident set size, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "rss"  # ru_maxrss is in KiB


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class ConsoleWriter:
    """Log lines above a progress bar (the bar only with ``progress``)."""

    def __init__(self, total: int, initial: int, progress: bool) -> None:
        self.bar = tqdm(
            total=total, initial=initial, desc="train", dynamic_ncols=True, mininterval=1.0, disable=not progress
        )

    def advance(self) -> None:
        self.bar.update(1)

    def write(self, event: Event) -> None:
        if event.postfix:
            self.bar.set_postfix(event.postfix)
        if event.line:
            tqdm.write(event.line)

    def close(self) -> None:
        self.bar.close()


class JsonlWriter:
    """One JSON line per event in ``metrics.jsonl`` (appended to on resume)."""

    def __init__(self, work_dir: Path) -> None:
        self.file = open(work_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()

    def write(self, event: Event) -> None:
        row = {"event": event.kind, "iteration": event.iteration, "time": time.time(), **event.record}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardWriter:
    """Event files in the run folder (``tensorboard --logdir <run folder>``)."""

    def __init__(self, work_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # slow import, only where TensorBoard is written

        self.writer = SummaryWriter(log_dir=str(work_dir))

    def write(self, event: Event) -> None:
        for tag, value in event.scalars.items():
            self.writer.add_scalar(tag, value, event.iteration)
        for tag, image in event.images.items():
            self.writer.add_image(tag, image, event.iteration, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def build_writers(work_dir: Path, console: ConsoleWriter | None) -> list[Writer]:
    """Rank 0's writers (pass ``console=None`` on other ranks to get none)."""
    if console is None:
        return []
    work_dir.mkdir(parents=True, exist_ok=True)
    return [console, JsonlWriter(work_dir), TensorBoardWriter(work_dir)]
