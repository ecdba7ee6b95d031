"""Helpers of ``benchmarks/gpu_check.sh``: the machine description at the top of its report, and a dry-run check of
the pytest selection.

    python benchmarks/gpu_check.py env            # markdown lines: date, commit, GPU, driver, torch, CUDA, cuDNN, CPU
    python benchmarks/gpu_check.py collected LOG  # how many tests a `pytest --collect-only -q` log lists (0: error)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> str | None:
    """A command's first output line, or None when it is missing or fails."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def commit() -> str:
    head = _run(["git", "rev-parse", "--short", "HEAD"])
    if head is None:
        return "unknown (not a git checkout)"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return head + (" with uncommitted changes" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_lines() -> list[str]:
    import torch

    lines = [f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
             f"Python {platform.python_version()}"]
    if not torch.cuda.is_available():
        return lines + ["- GPU: none (torch.cuda.is_available() is False)"]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"- GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability "
                     f"{p.major}.{p.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    lines.append(f"- driver: {driver or 'unknown (no nvidia-smi)'}")
    return lines


def environment() -> list[str]:
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return [f"- date: {now}", f"- host: {platform.node()}, commit {commit()}",
            f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)", *gpu_lines()]


def collected(log: Path) -> int:
    """Tests listed by ``pytest --collect-only -q`` (``path::name`` lines), 0 when the log reports an error."""
    text = log.read_text(errors="replace")
    if re.search(r"^(ERROR|E )|errors? during collection", text, re.MULTILINE):
        return 0
    return sum(1 for line in text.splitlines() if "::" in line and not line.startswith(" "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="markdown lines describing this machine and checkout")
    count = sub.add_parser("collected", help="number of tests in a pytest --collect-only -q log")
    count.add_argument("log", type=Path)
    args = parser.parse_args()
    if args.command == "env":
        print("\n".join(environment()))
    else:
        n = collected(args.log)
        print(n)
        sys.exit(0 if n > 0 else 1)


if __name__ == "__main__":
    main()
