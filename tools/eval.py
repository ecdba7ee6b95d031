"""Evaluate a checkpoint of any task on a split of CONFIG's data, with the task's metric: segmentation (a
Cityscapes split: mIoU, per-class IoU, pixel and mean accuracy, the official evaluator, test-server PNGs),
classification (CIFAR / MNIST test images or an image-folder split: top-1 and top-5 accuracy), ...

    python tools/eval.py CONFIG CHECKPOINT [--split val] [--mode whole|slide] [--crop H W] [--stride H W]
                         [--scales 0.75 1.0 1.25] [--flip] [--official] [--format-only --out DIR]
    python tools/eval.py configs/cifar10/resnet18_deconv.yaml checkpoints/cifar10/resnet18_deconv/best.pth
    torchrun --nproc_per_node=N tools/eval.py CONFIG CHECKPOINT ...

CONFIG supplies the data root and evaluation settings; the model is rebuilt from the config stored in
the checkpoint, whose task decides what is measured and which further options it takes (seg/tasks/: its
Task.evaluate_checkpoint and Task.add_eval_arguments; the Cityscapes options above are segmentation's,
seg/tasks/segmentation_eval.py). Segmentation runs at
full resolution by default; each image is counted once under torchrun. Results go to metrics.json.
With a configs/paper/*.yaml CONFIG (its labels and its short side 520), a checkpoint with the paper's 21
outputs, or --reference-compat, the paper's code's scores (21 classes, void counted, the mean of all 21)
follow the 19-class table as a second, labelled one (miou_reference in metrics.json).

Exit codes (the README's table, seg/errors.py): 0 done; 2 bad arguments, config or --opts key, missing or unusable
checkpoint, missing or unreadable data, or a failure of the official evaluator (one line `error: <message>` on
stderr naming the key or file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from seg.config import ConfigError, load_config
from seg.engine.distributed import DistInfo, finish, init_distributed
from seg.errors import EXIT_USER_ERROR, UserError, error_message
from seg.inference import load_checkpoint_model, pick_device
from seg.tasks import TASKS, EvalRequest, build_task, untrained_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``task_options`` holds the names of each task's own options (added by the task)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (data root, eval settings)")
    p.add_argument("checkpoint", help="training checkpoint (.pth); its stored config rebuilds the model")
    p.add_argument("--split", help="dataset split (default: data.val_split)")
    p.add_argument("--batch-size", type=int, help="images (slide: crops) per forward pass (default: eval.batch_size)")
    p.add_argument("--num-workers", type=int, help="data loader workers (default: data.num_workers)")
    p.add_argument("--out", help="output folder (default: <checkpoint folder>/eval_<split>)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: CUDA when available")
    p.add_argument("--no-fold", action="store_true", help="keep deconvolution layers unfolded")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(task_options={name: task.add_eval_arguments(p) for name, task in TASKS.items()})
    return p.parse_args(argv)


def run(args: argparse.Namespace, info: DistInfo) -> int:
    cfg = load_config(args.config, args.opts)
    model, trained = load_checkpoint_model(args.checkpoint, info.device, build=untrained_model)
    task_options = args.task_options
    given = [name for options in task_options.values() for name in options if getattr(args, name) not in (None, False)]
    foreign = [f"--{name.replace('_', '-')}" for name in given if name not in task_options[trained.task]]
    if foreign:
        raise ConfigError(f"{' '.join(foreign)}: not options of a {trained.task} model's evaluation "
                          f"({args.checkpoint} is one)")
    if cfg.task != trained.task:
        raise ConfigError(f"{args.config} is a {cfg.task} config; {args.checkpoint} is a {trained.task} model "
                          f"(use its training config, e.g. its run folder's config.yaml)")
    split = args.split or cfg.data.val_split
    request = EvalRequest(
        config_path=args.config, checkpoint=args.checkpoint, split=split,
        out_dir=Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / f"eval_{split}",
        device=info.device, fold=not args.no_fold, batch_size=args.batch_size, num_workers=args.num_workers,
        options={name: getattr(args, name) for name in task_options[trained.task]},
    )
    # CONFIG supplies the data and evaluation settings, the checkpoint the model; the task decides the rest.
    report = build_task(cfg).evaluate_checkpoint(model, trained, request)
    if info.is_main:
        path = request.out_dir / "metrics.json"
        path.write_text(json.dumps(report, indent=2, allow_nan=True))
        print(f"results written to {path}")
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        pick_device(args.device)  # a clear error for --device cuda without CUDA, before joining a group
    except UserError as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    info = init_distributed(args.device)
    try:
        code = run(args, info)
    except (UserError, ConfigError, OSError) as e:  # OSError: e.g. an --out folder that cannot be written
        print(f"error: {error_message(e)}", file=sys.stderr)
        code = EXIT_USER_ERROR
    finish(info, code)  # under torchrun: tears the process group down without gloo's exit-time abort


if __name__ == "__main__":
    main()
