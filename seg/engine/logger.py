"""What a run reports: TensorBoard scalars/images, a JSON-lines metrics file, and progress lines.

Only rank 0 writes; other ranks get a logger whose methods do nothing.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


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


def denormalize(image: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """A normalised 3xHxW tensor back to an HxWx3 uint8 RGB array."""
    img = image.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


class RunLogger:
    """TensorBoard + ``metrics.jsonl`` in the run folder; inert when ``enabled`` is False."""

    def __init__(self, work_dir: str | Path, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        self._jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(work_dir))
            self._jsonl = open(Path(work_dir) / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()

    def record(self, event: str, iteration: int, **values: Any) -> None:
        """One JSON line; the machine-readable history of the run."""
        if self._jsonl is not None:
            self._jsonl.write(
                json.dumps({"event": event, "iteration": iteration, "time": time.time(), **values}) + "\n"
            )
            self._jsonl.flush()

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, iteration)

    def images(self, iteration: int, images: dict[str, np.ndarray]) -> None:
        """HxWx3 uint8 RGB arrays."""
        if self.writer is not None:
            for k, v in images.items():
                self.writer.add_image(k, v, iteration, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
