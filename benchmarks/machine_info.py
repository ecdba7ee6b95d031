"""The machine a benchmark ran on, for its report: torch-free, so gpu_check.py can ask before torch imports."""

from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's ``model name`` (/proc/cpuinfo, as ``lscpu`` shows it), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
