"""Run a study: every (variant, seed) of a study file as an ordinary training run, then compare the variants.

    python tools/study.py studies/normalization_synthetic.yaml
    python tools/study.py studies/normalization_synthetic.yaml --jobs 2 --opts train.iterations=100
    python tools/study.py studies/normalization_cityscapes.yaml --device cuda --jobs 4   # one GPU per run

Runs go to DIR/<variant>/seed<k>/ (DIR: --out, default checkpoints/studies/<name>), each with its train.log; a
study file with a `sweep` first trains its selection runs in DIR/<variant>/sweep/<key>_<value>/seed<k>/, picks each
variant's value by the file's rule, then trains the reported seeds at that value.
Running the command again skips finished (and diverged) runs and resumes interrupted ones, then rewrites
DIR/study.json, DIR/study.md and the figures. Ctrl-C stops every running child cleanly (each saves last.pth).

Exit codes (the README's table, seg/errors.py): 0 every run finished or diverged (a divergence is a result,
counted in the report), 1 a run failed (its log tail is in study.json), 2 bad study file, config or arguments,
or another expected error before the runs, 128 + signal number when stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from seg.errors import (  # noqa: E402
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SIGNAL_BASE,
    EXIT_USER_ERROR,
    UserError,
    error_message,
)
from seg.study import load_study, run_study  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="study file, e.g. studies/normalization_synthetic.yaml")
    p.add_argument("--out", help="study folder (default: checkpoints/studies/<name>)")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides for every run, after the study file's own")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    return p.parse_args(argv)


def _relative(path: Path, out: Path) -> str:
    """``bn/seed0`` or ``bn/sweep/lr_0.1/seed100``: a run folder as the study folder names it."""
    try:
        return str(path.relative_to(out))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.jobs < 1:
        print(f"error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return EXIT_USER_ERROR
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    try:
        study = load_study(args.study)
        result = run_study(study, Path(args.out) if args.out else None, args.opts, device, args.jobs, gpus)
    except UserError as e:  # ConfigError included
        print(f"error: {error_message(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    out = Path(result.summary["out"])
    print(f"report: {out / 'study.md'} (numbers: {out / 'study.json'}, figures: {out}/*.png)")
    if result.signum is not None:
        return EXIT_SIGNAL_BASE + result.signum
    if result.failed:
        names = ", ".join(f"{_relative(Path(r.work_dir), out)} ({r.status})" for r in result.failed)
        print(f"error: {len(result.failed)} run(s) did not finish: {names}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
