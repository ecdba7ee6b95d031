"""Small-sample statistics of a study: mean, sample standard deviation, Student-t confidence intervals.

The t quantile is computed here (closed-form t distribution for integer degrees of freedom, inverted by
bisection) so the study does not depend on SciPy, which is only a transitive dependency of ours.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def t_two_sided_mass(t: float, dof: int) -> float:
    """P(|T| <= t) for Student's t with ``dof`` degrees of freedom (Abramowitz & Stegun 26.7.3-4)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(dof))
    c2 = math.cos(theta) ** 2
    if dof % 2 == 1:
        # (2/pi) * (theta + sin cos * (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ... up to c^(dof-3)))
        series, term = (1.0 if dof > 1 else 0.0), 1.0
        for k in range(1, (dof - 1) // 2):
            term *= 2 * k / (2 * k + 1) * c2
            series += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    # sin * (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(dof-2))
    series, term = 1.0, 1.0
    for k in range(1, dof // 2):
        term *= (2 * k - 1) / (2 * k) * c2
        series += term
    return math.sin(theta) * series


def t_quantile(level: float, dof: int) -> float:
    """The t with P(|T| <= t) = ``level`` (e.g. 0.95 -> 12.706 for 1 dof, 2.776 for 4)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = 0.0, 1.0
    while t_two_sided_mass(hi, dof) < level:
        lo, hi = hi, 2 * hi
    for _ in range(200):  # the mass is increasing in t: bisect to machine precision
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_two_sided_mass(mid, dof) < level else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Estimate:
    """Mean of ``n`` values with the sample standard deviation and a t interval (both None when n < 2)."""

    n: int
    mean: float
    std: float | None
    ci: tuple[float, float] | None
    level: float

    def contains(self, value: float) -> bool | None:
        """Whether the interval contains ``value`` (None without an interval)."""
        return None if self.ci is None else self.ci[0] <= value <= self.ci[1]


def estimate(values: Sequence[float], level: float = 0.95) -> Estimate | None:
    """Mean, std (n - 1 in the denominator) and mean ± t(level, n - 1) · std / sqrt(n); None for no values."""
    n = len(values)
    if n == 0:
        return None
    mean = math.fsum(values) / n
    if n < 2:
        return Estimate(n, mean, None, None, level)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(level, n - 1) * std / math.sqrt(n)
    return Estimate(n, mean, std, (mean - half, mean + half), level)


def paired_differences(values: Mapping[int, float], baseline: Mapping[int, float]) -> dict[int, float]:
    """``values[s] - baseline[s]`` for every seed ``s`` both have: the pairing removes seed-to-seed noise that
    both variants share (same data order, same initial draws)."""
    return {s: values[s] - baseline[s] for s in sorted(values) if s in baseline}


def median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered, mid = sorted(values), len(values) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
