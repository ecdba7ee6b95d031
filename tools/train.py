"""Train a model from a YAML config, in one process or under torchrun.

    python tools/train.py configs/demo.yaml
    python tools/train.py configs/deeplab_deconv.yaml --opts train.lr=0.05 data.num_workers=8
    torchrun --standalone --nproc_per_node=4 tools/train.py configs/deeplab_deconv.yaml
    python tools/train.py configs/deeplab_deconv.yaml --resume            # latest checkpoint of the run folder

The run folder is checkpoints/<config name>/ unless the config's work_dir or --work-dir says otherwise.

Exit codes (the README's table, seg/errors.py): 0 finished; 1 the loss became NaN/Inf (or a bug, with its
traceback); 2 bad config or arguments, missing or unreadable data, a bad checkpoint to resume; 128 + signal number
when stopped by SIGINT/SIGTERM (a checkpoint was saved first). Expected errors print one `error: ...` line.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from pathlib import Path

from seg.checkpoint import latest_checkpoint
from seg.config import ConfigError, dump_yaml, load_config
from seg.engine import NonFiniteLossError, elastic_restart_count, finish, init_distributed, train
from seg.errors import EXIT_FAILED, EXIT_OK, EXIT_SIGNAL_BASE, EXIT_USER_ERROR, UserError, error_message
from seg.tasks import TASKS

RUNS = Path("checkpoints")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config, e.g. configs/deeplab_deconv.yaml")
    p.add_argument(
        "--opts",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. train.lr=0.05 model.encoder=resnet101",
    )
    p.add_argument("--work-dir", help="run folder (default: the config's work_dir, else checkpoints/<config name>)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CKPT",
        help="continue from CKPT, or without a path from the run folder's last.pth",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--no-progress", action="store_true", help="log lines only, no progress bar")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.opts)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    work_dir = Path(args.work_dir or cfg.work_dir or RUNS / Path(args.config).stem)
    try:
        info = init_distributed(args.device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    resume = args.resume
    if resume is None and elastic_restart_count() > 0 and latest_checkpoint(work_dir) is not None:
        # torchrun --max-restarts restarted the workers after a failure: continue where the last save was.
        resume = True
    if info.is_main:
        print(dump_yaml(cfg), flush=True)
    code = EXIT_OK
    try:
        result = train(cfg, info, work_dir, resume=resume, show_progress=not args.no_progress)
        if result.status == "interrupted":
            code = EXIT_SIGNAL_BASE + int(getattr(signal, result.signal_name or "SIGTERM", signal.SIGTERM))
        elif info.is_main:
            task = TASKS[cfg.task]
            best = "n/a" if result.best_metric is None else task.format_metric(result.best_metric)
            print(f"done: {result.iteration} iterations, best val {task.metric_label} {best}; "
                  f"checkpoints in {work_dir}")
    except NonFiniteLossError as e:  # the training itself failed (a study counts it as diverged)
        print(f"error: {error_message(e)}", file=sys.stderr)
        code = EXIT_FAILED
    except UserError as e:  # ConfigError included
        print(f"error: {error_message(e)}", file=sys.stderr)
        code = EXIT_USER_ERROR
    except Exception:
        traceback.print_exc()
        code = EXIT_FAILED
    finish(info, code)  # under torchrun: destroy the group and os._exit, never a gloo abort at shutdown
    return code


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
