"""Checkpoint *files* (what a run saves is :mod:`seg.engine.checkpointer`'s): atomic writes and the one way to
read them (``weights_only=True``, one error type).

A training checkpoint is a dict ``{'model', 'config', 'iteration', 'optimizer', 'scheduler', 'scaler',
'rng', 'best_metric', ...}`` of tensors and plain data. Weight files from elsewhere (a bare state_dict, a
classification checkpoint) are read with :func:`read_weights`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from seg.errors import UserError

LAST = "last.pth"
BEST = "best.pth"


class CheckpointError(UserError):
    """A checkpoint or weights file is missing, unreadable or not what was expected."""


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then ``os.replace(tmp, path)``: readers see the old file
    or the new one, never a partial one; the temporary file never outlives a failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` through a temporary file and ``os.replace``.

    A crash or a kill during the write leaves the previous file intact: readers see either the old
    checkpoint or the new one, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)
        _fsync(tmp)

    return _replace_atomically(path, write)


def same_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Make ``dst`` hold what ``src`` holds without writing it again: a hard link (a copy where the filesystem
    has none), put in place by ``os.replace`` like :func:`save_checkpoint`.

    ``best.pth`` is usually the ``last.pth`` just written; linking skips a second serialisation of the whole
    state. It stays correct because :func:`save_checkpoint` never writes into an existing file: the next
    ``last.pth`` is a new file replacing the name, and the link keeps the old contents.
    """
    src = Path(src)

    def write(tmp: Path) -> None:
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (some network or FAT filesystems)
            shutil.copyfile(src, tmp)
            _fsync(tmp)

    return _replace_atomically(Path(dst), write)


def _torch_load(path: Path, map_location: str | torch.device, what: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated, foreign or pickled-object files
        raise CheckpointError(
            f"cannot read {what} {path}: expected a file written by torch.save with tensors and plain data "
            f"(e.g. a run folder's last.pth); torch.load(weights_only=True) said: {e}"
        ) from e


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint written by :func:`save_checkpoint` (it must hold 'model' and 'config')."""
    path = Path(path)
    state = _torch_load(path, map_location, "checkpoint")
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a training checkpoint (expected keys 'model' and 'config', got {keys})")
    return state


def read_weights(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Tensors of a weights file: a state_dict, or a checkpoint with one under ``model``/``state_dict``.

    A ``module.`` prefix (DistributedDataParallel) is removed.
    """
    path = Path(path)
    obj = _torch_load(path, "cpu", what)
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{what} {path} holds no state_dict (expected a mapping of names to tensors, "
            f"or a checkpoint with one under 'model' or 'state_dict')"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    """The checkpoint to resume from in ``work_dir`` (``last.pth``), or None when there is none."""
    last = Path(work_dir) / LAST
    return last if last.is_file() else None
