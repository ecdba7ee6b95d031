"""Argument checks shared by the layers of ``seg.nn``: a bad setting is a ``ValueError`` naming it and its value."""

from __future__ import annotations

from typing import Any


def check_positive(name: str, value: Any, kind: type = int) -> None:
    """``value`` is a positive number (``kind`` int: a positive int; bools are neither)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if kind is int:
        ok = ok and isinstance(value, int)
    if not ok:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")


def check_momentum(value: Any) -> None:
    """A running-statistics update rate, in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"momentum must be in (0, 1], got {value!r}")
