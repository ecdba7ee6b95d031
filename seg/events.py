"""The record of one log point (:class:`Event`): what a task reports of a validation and the loop of a step.

It lives below both the tasks and the engine, so a task can build one without importing the engine; the
engine's writers (:mod:`seg.engine.writers`) each take their part of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Event:
    """One log point: ``kind`` is ``train``, ``val`` or ``final``."""

    kind: str
    iteration: int
    record: dict[str, Any]  # metrics.jsonl fields
    scalars: dict[str, float] = field(default_factory=dict)  # TensorBoard tag -> value
    images: dict[str, np.ndarray] = field(default_factory=dict)  # TensorBoard tag -> HxWx3 uint8 RGB
    line: str | None = None  # console
    postfix: dict[str, str] = field(default_factory=dict)  # progress bar
