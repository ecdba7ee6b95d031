"""Evaluate a checkpoint of any task on a split of CONFIG's data, with the task's metric: segmentation (a
Cityscapes split: mIoU, per-class IoU, pixel and mean accuracy, the official evaluator, test-server PNGs),
classification (CIFAR / MNIST test images or an image-folder split: top-1 and top-5 accuracy), ...

    python tools/eval.py CONFIG CHECKPOINT [--split val] [--mode whole|slide] [--crop H W] [--stride H W]
                         [--scales 0.75 1.0 1.25] [--flip] [--official] [--format-only --out DIR]
    python tools/eval.py configs/cifar10/resnet18_deconv.yaml checkpoints/cifar10/resnet18_deconv/best.pth
    torchrun --nproc_per_node=N tools/eval.py CONFIG CHECKPOINT ...

CONFIG supplies the data root and evaluation settings; the model is rebuilt from the config stored in
the checkpoint, whose task decides what is measured (seg/tasks/: its eval dataset, metric and summary;
the Cityscapes options below are segmentation's). Segmentation runs at
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
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from seg.config import Config, ConfigError, load_config, to_dict
from seg.data import CityscapesDataset, build_transforms
from seg.data.labels import CLASS_NAMES, NUM_CLASSES, REFERENCE_CLASS_NAMES, reference_to_train
from seg.engine.distributed import DistInfo, barrier, finish, init_distributed
from seg.errors import EXIT_USER_ERROR, UserError, error_message
from seg.evaluation import build_eval_loader, evaluate, format_table
from seg.evaluation.evaluator import outputs_reference_ids
from seg.evaluation.official import format_official, prediction_path, run_official_eval, save_label_ids
from seg.inference import Predictor, load_checkpoint_model, pick_device
from seg.nn import fold_deconv
from seg.tasks import build_task, untrained_model
from seg.tasks.segmentation import SegmentationTask


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (data root, eval settings)")
    p.add_argument("checkpoint", help="training checkpoint (.pth); its stored config rebuilds the model")
    p.add_argument("--split", help="dataset split (default: data.val_split)")
    p.add_argument("--mode", choices=("whole", "slide"), help="inference mode (default: eval.mode)")
    p.add_argument("--crop", nargs=2, type=int, metavar=("H", "W"), help="slide crop size")
    p.add_argument("--stride", nargs=2, type=int, metavar=("H", "W"), help="slide stride")
    p.add_argument("--scales", nargs="+", type=float, help="test-time scales, e.g. 0.75 1.0 1.25")
    p.add_argument("--flip", action="store_true", default=None, help="add horizontally flipped views")
    p.add_argument("--batch-size", type=int, help="images (slide: crops) per forward pass")
    p.add_argument("--num-workers", type=int, help="data loader workers (default: data.num_workers)")
    p.add_argument("--official", action="store_true", help="also score with cityscapesscripts' evaluator")
    p.add_argument("--format-only", action="store_true", help="only write labelId PNGs for the test server")
    p.add_argument(
        "--reference-compat",
        action="store_true",
        default=None,
        help="the paper's reference scoring: 21 classes with void as class 0, all averaged, short side 520 "
        "(NOT the Cityscapes benchmark metric)",
    )
    p.add_argument("--out", help="output folder (default: <checkpoint folder>/eval_<split>)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: CUDA when available")
    p.add_argument("--no-fold", action="store_true", help="keep deconvolution layers unfolded")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    return p.parse_args(argv)


def run(args: argparse.Namespace, info: DistInfo) -> int:
    cfg = load_config(args.config, args.opts)
    chosen = {
        "mode": args.mode,
        "crop_size": args.crop,
        "stride": args.stride,
        "scales": args.scales,
        "flip": args.flip,
        "batch_size": args.batch_size,
        "reference_compat": args.reference_compat,
    }
    eval_cfg = dataclasses.replace(cfg.eval, **{k: v for k, v in chosen.items() if v is not None})
    split = args.split or cfg.data.val_split
    if (args.official or args.format_only) and (eval_cfg.reference_compat or cfg.data.val_short_side):
        why = "--reference-compat scores" if eval_cfg.reference_compat else f"{args.config} validates"
        raise ConfigError(
            f"{why} at short side {cfg.data.val_short_side or 520}; --official and --format-only need full "
            f"resolution: use a benchmark config, e.g. tools/eval.py configs/deeplab_deconv.yaml CHECKPOINT --official"
        )

    model, trained = load_checkpoint_model(args.checkpoint, info.device, build=untrained_model)
    if trained.task != SegmentationTask.name:  # the Cityscapes evaluation below is segmentation's own
        return run_task(args, info, cfg, trained, model, split)
    predictor = Predictor(
        model, mean=trained.data.mean, std=trained.data.std, mode=eval_cfg.mode, crop_size=eval_cfg.crop_size,
        stride=eval_cfg.stride, scales=eval_cfg.scales, flip=eval_cfg.flip, batch_size=eval_cfg.batch_size,
        device=info.device, fold=not args.no_fold, config=trained,
    )
    # Normalise exactly as the model was trained; the data root and split come from CONFIG.
    data_cfg = dataclasses.replace(cfg.data, mean=trained.data.mean, std=trained.data.std)
    dataset = CityscapesDataset(
        data_cfg.root, split, transform=build_transforms(data_cfg, train=False), label_mapping=data_cfg.label_mapping
    )
    reference_targets = data_cfg.label_mapping == "reference"
    reference_ids = eval_cfg.reference_compat or reference_targets or outputs_reference_ids(predictor)
    size = f"short side {data_cfg.val_short_side}" if data_cfg.val_short_side else "full resolution"
    if eval_cfg.reference_compat:
        size = "short side 520"
    workers = data_cfg.num_workers if args.num_workers is None else args.num_workers
    loader = build_eval_loader(dataset, batch_size=1, num_workers=workers)

    out_dir = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / f"eval_{split}"
    pred_dir = out_dir / "pred_labelIds"
    write_pngs = args.official or args.format_only
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if write_pngs and pred_dir.exists():
            shutil.rmtree(pred_dir)  # predictions of an earlier run must not be scored
        print(
            f"evaluating {args.checkpoint} on {data_cfg.root} [{split}]: {len(dataset)} images at {size}, "
            f"mode {eval_cfg.mode}, scales {eval_cfg.scales}, flip {eval_cfg.flip}, "
            f"{info.world_size} process(es) on {info.device}"
        )
    barrier(info)

    def save_batch(indices, pred, _target):
        for i, p in zip(indices, pred, strict=True):
            p = p.cpu().numpy()
            # The paper's ids back to trainIds; a void prediction becomes 'unlabeled', a miss for the evaluator.
            train_ids = reference_to_train(p) if reference_ids else p.astype("uint8")
            save_label_ids(train_ids, prediction_path(pred_dir, dataset.files[i][0]))

    start = time.perf_counter()
    metrics = evaluate(
        None,
        loader,
        info.device,
        num_classes=NUM_CLASSES,
        predictor=predictor,
        reference_compat=eval_cfg.reference_compat,
        reference_targets=reference_targets,
        progress=True,
        on_batch=save_batch if write_pngs else None,
    )
    elapsed = time.perf_counter() - start
    barrier(info)  # every shard's PNGs are written before the official evaluator reads them
    if not info.is_main:
        return 0

    report: dict = {
        "checkpoint": str(args.checkpoint),
        "split": split,
        "eval": to_dict(eval_cfg),
        "seconds": round(elapsed, 2),
    }
    if args.format_only:
        print(
            f"wrote {metrics['num_images']} labelId PNGs to {pred_dir} (zip this folder for the test server)"
        )
        report["predictions"] = str(pred_dir)
    else:
        title = f"19 Cityscapes classes at {size}" + (" (full resolution is the benchmark's)" if
                                                       data_cfg.val_short_side or eval_cfg.reference_compat else "")
        print(format_table(metrics, CLASS_NAMES, title=title))
        report["metrics"] = {k: v for k, v in metrics.items() if k != "confusion_matrix"}
        report["metrics"]["class_names"] = list(CLASS_NAMES)
        if "miou_reference" in metrics:
            reference = {"iou": metrics["iou_reference"], "miou": metrics["miou_reference"],
                         "acc": metrics["acc_reference"], "class_acc": metrics["class_acc_reference"],
                         "macc": float("nan")}
            print()
            print(format_table(reference, REFERENCE_CLASS_NAMES, title=(
                f"the paper's code's scores at {size}: 21 classes, void counted, class 20 never a label, "
                f"mIoU = mean of all 21 (NOT the Cityscapes benchmark metric)")))
            report["metrics"]["class_names_reference"] = list(REFERENCE_CLASS_NAMES)
        report["confusion_matrix"] = metrics["confusion_matrix"]
        if args.official:
            official = run_official_eval(pred_dir, data_cfg.root, split, json_out=out_dir / "official.json")
            print(format_official(official))
            report["official"] = official
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(report, indent=2, allow_nan=True))
    print(f"results written to {path}")
    return 0


SEGMENTATION_ONLY = ("mode", "crop", "stride", "scales", "flip", "official", "format_only", "reference_compat")


def run_task(
    args: argparse.Namespace, info: DistInfo, cfg: Config, trained: Config, model, split: str
) -> int:
    """The task's metric of a (non-segmentation) checkpoint on ``split`` of CONFIG's data (each sample once)."""
    task_name = trained.task
    given = [f"--{k.replace('_', '-')}" for k in SEGMENTATION_ONLY if getattr(args, k) not in (None, False)]
    if given:
        raise ConfigError(f"{' '.join(given)}: segmentation options; {args.checkpoint} is a {task_name} model")
    if cfg.task != task_name:
        raise ConfigError(f"{args.config} is a {cfg.task} config; {args.checkpoint} is a {task_name} model "
                          f"(use its training config, e.g. its run folder's config.yaml)")
    # The data (dataset, root, split) come from CONFIG, the model and its classes from the checkpoint.
    task = build_task(dataclasses.replace(cfg, model=trained.model))
    dataset = task.build_eval_dataset(split)
    workers = cfg.data.num_workers if args.num_workers is None else args.num_workers
    loader = build_eval_loader(dataset, batch_size=args.batch_size or cfg.eval.batch_size, num_workers=workers)
    if not args.no_fold:
        model = fold_deconv(model)  # eval-mode deconvolution as plain convs: the same outputs, faster
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / f"eval_{split}"
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"evaluating {args.checkpoint} on {cfg.data.dataset} at {cfg.data.root} [{split}]: {len(dataset)} "
              f"images, {info.world_size} process(es) on {info.device}")
    start = time.perf_counter()
    metrics = task.evaluate(model, loader, info.device, None, progress=True)
    elapsed = time.perf_counter() - start
    if not info.is_main:
        return 0
    print(task.summary(metrics))
    report = {"checkpoint": str(args.checkpoint), "split": split, "dataset": cfg.data.dataset,
              "seconds": round(elapsed, 2), "metrics": metrics}
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(report, indent=2))
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
