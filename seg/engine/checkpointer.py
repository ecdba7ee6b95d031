"""The run's saving *policy* (the file format is :mod:`seg.checkpoint`'s): what to save and restore for an exact
resume, when, and which checkpoint is the best.

A checkpoint holds the model, optimizer, scheduler and grad-scaler states, every rank's RNG streams, the
config it was trained with, the iteration and the best validation metric so far, as tensors and plain data
(``torch.load(weights_only=True)`` reads it; see :mod:`seg.checkpoint` for the file format).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seg.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    same_checkpoint,
    save_checkpoint,
)
from seg.config import from_dict, to_dict
from seg.engine.distributed import DistInfo, all_gather_objects
from seg.errors import UserError


class NonFiniteLossError(UserError):
    """The loss (or the weights) became NaN or Inf; training stopped without saving the broken weights."""


def params_finite(model: nn.Module) -> bool:
    """True when every parameter and floating buffer is finite (guards against saving NaN weights)."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def capture_rng() -> dict[str, Any]:
    """The RNG states of this process: torch (CPU and CUDA), NumPy's global and Python's ``random``."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting that differs (the run folder is not a setting)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{k}.")
        elif a != b and k != "work_dir":
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


class Checkpointer:
    """Saves ``last.pth`` (and ``best.pth`` when the validation metric improves) atomically; resumes.

    ``save`` is collective under ``torchrun`` (it gathers every rank's RNG streams); only rank 0 writes.
    Higher values of the metric are better.
    """

    def __init__(
        self,
        work_dir: Path,
        info: DistInfo,
        config: dict[str, Any],
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: torch.amp.GradScaler,
        log: Callable[[str], None] = print,
    ) -> None:
        self.work_dir = work_dir
        self.info = info
        self.config = config
        self.objects = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
        self.log = log
        self.best: float | None = None
        self.train_seconds = 0.0  # time spent in training steps, over all resumed parts of the run

    def find(self, resume: str | Path | bool | None) -> Path | None:
        """The file ``resume`` names: True means this run folder's ``last.pth``."""
        if resume is True:
            path = latest_checkpoint(self.work_dir)
            if path is None:
                raise CheckpointError(f"--resume: no {LAST} in {self.work_dir} to resume from")
            return path
        return Path(resume) if resume else None

    def resume(self, path: Path) -> int:
        """Restore every state from ``path``; returns the iteration to continue from."""
        ckpt = load_checkpoint(path, map_location=self.info.device)
        for key, obj in self.objects.items():
            if ckpt.get(key):  # a run without a grad scaler stored an empty state
                obj.load_state_dict(ckpt[key])
        self.best = ckpt.get("best_metric")
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        rngs = ckpt.get("rng") or []
        if len(rngs) == self.info.world_size:
            restore_rng(rngs[self.info.rank])
        else:
            self.log(
                f"warning: checkpoint has RNG states of {len(rngs)} processes, this run has "
                f"{self.info.world_size}; continuing with fresh random streams"
            )
        # Through from_dict: the stored settings are checked, and fields added since then get their defaults.
        changed = config_changes(to_dict(from_dict(ckpt["config"], str(path))), self.config)
        if changed:
            self.log(f"resuming with changed settings: {', '.join(changed)}")
        iteration = int(ckpt["iteration"])
        self.log(f"resumed from {path} at iteration {iteration}")
        return iteration

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far (and if so, it becomes the best)."""
        if self.best is None or value > self.best:
            self.best = value
            return True
        return False

    def save(self, iteration: int, best: bool = False) -> None:
        """Write ``last.pth`` (and ``best.pth`` when ``best``); refuses to overwrite them with NaN weights."""
        state = {key: obj.state_dict() for key, obj in self.objects.items()}
        # Collective: each rank resumes its own streams, and every rank learns whether any rank's weights are
        # broken, so that all raise together (a rank raising alone leaves the others waiting in the next
        # collective until the process-group timeout).
        gathered = all_gather_objects((capture_rng(), params_finite(self.objects["model"])), self.info)
        state.update(
            config=self.config,
            iteration=iteration,
            best_metric=self.best,
            train_seconds=self.train_seconds,
            rng=[rng for rng, _ in gathered],
        )
        broken = [rank for rank, (_, finite) in enumerate(gathered) if not finite]
        if broken:
            raise NonFiniteLossError(f"weights are not finite at iteration {iteration} on process(es) {broken}; "
                                     f"not saving over {LAST}")
        if not self.info.is_main:
            return
        save_checkpoint(state, self.work_dir / LAST)
        if best:
            same_checkpoint(self.work_dir / LAST, self.work_dir / BEST)
