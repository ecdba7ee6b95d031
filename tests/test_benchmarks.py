"""The whole-model benchmark runs end to end on a tiny setting (every table) and rejects bad options by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_train_step_prints_ratios_norms_variants_and_breakdown():
    proc = run("--encoder", "resnet18", "--arch", "fcn", "--os", "16", "--size", "64", "128", "--batch", "2",
               "--repeats", "1", "--warmup", "0", "--no-memory", "--variant", "stats_every=2,matrix_grad=false",
               "--breakdown", "--norm", "deconv", "gn", "none")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    main = next(line for line in lines if line.startswith("| fcn resnet18 | 16 | ") and line.count("|") == 13)
    assert float(main.split("|")[5].strip().rstrip("x")) > 0  # the deconv/BN training ratio
    # One row per norm, bn (the baseline, timed though not named) first, each with its ratios to bn.
    norms = [line.split("|") for line in lines if line.startswith("| fcn resnet18 | 16 | ") and line.count("|") == 10]
    assert [cells[3].strip() for cells in norms] == ["bn", "deconv", "gn", "none"]
    assert all(cells[5].strip() == "1.00x" and cells[7].strip() == "1.00x" for cells in norms[:1])
    assert all(float(cells[5].strip().rstrip("x")) > 0 and cells[7].strip().endswith("x") for cells in norms)
    variant = next(line for line in lines if "| stats_every=2,matrix_grad=false |" in line)
    assert variant.split("|")[5].strip().endswith("x")
    parts = next(line for line in lines if line.startswith("| fcn resnet18 | 16 | ") and "%" in line)
    cells = [c.strip() for c in parts.split("|")[1:-1]]
    # step BN, step deconv, extra, then the parts and the rest, which add up to the extra
    extra = float(cells[4])
    shares = [float(c.split()[0]) for c in cells[5:]]
    assert abs(sum(shares) - extra) < 2e-3 * max(1.0, len(shares))
    assert shares[0] > 0 and shares[2] > 0  # the fold and the inverse square root were seen by the profiler


def test_train_step_rejects_unknown_variant_keys():
    proc = run("--variant", "stats_every=2,bogus=1")
    assert proc.returncode == 2
    assert "model.deconv.bogus" in proc.stderr


def test_train_step_rejects_unknown_norms_and_a_breakdown_without_deconv():
    proc = run("--norm", "gn", "layernorm")
    assert proc.returncode == 2 and "--norm" in proc.stderr and "layernorm" in proc.stderr
    proc = run("--norm", "gn", "--breakdown")
    assert proc.returncode == 2 and "add deconv to --norm" in proc.stderr
