"""Segmentation's checkpoint evaluation for ``tools/eval.py``: a Cityscapes split at full resolution (or the
paper's short side), test-time augmentation, the 19-class table (and the paper's 21-class one), the official
``cityscapesscripts`` evaluator and labelId PNGs for the test server."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from seg.config import Config, ConfigError, to_dict
from seg.data import CityscapesDataset, build_transforms
from seg.data.labels import CLASS_NAMES, NUM_CLASSES, REFERENCE_CLASS_NAMES, reference_to_train
from seg.distributed import barrier, is_main_process, world_size
from seg.evaluation import build_eval_loader, evaluate, format_table
from seg.evaluation.evaluator import outputs_reference_ids
from seg.evaluation.official import format_official, prediction_path, run_official_eval, save_label_ids
from seg.inference import Predictor

if TYPE_CHECKING:
    from seg.tasks.base import EvalRequest


def add_eval_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """The segmentation options of ``tools/eval.py`` (each overrides its ``eval.*`` key); returns their names."""
    g = parser.add_argument_group("segmentation (Cityscapes) checkpoints")
    actions = [
        g.add_argument("--mode", choices=("whole", "slide"), help="inference mode (default: eval.mode)"),
        g.add_argument("--crop", nargs=2, type=int, metavar=("H", "W"), help="slide crop size"),
        g.add_argument("--stride", nargs=2, type=int, metavar=("H", "W"), help="slide stride"),
        g.add_argument("--scales", nargs="+", type=float, help="test-time scales, e.g. 0.75 1.0 1.25"),
        g.add_argument("--flip", action="store_true", default=None, help="add horizontally flipped views"),
        g.add_argument("--official", action="store_true", help="also score with cityscapesscripts' evaluator"),
        g.add_argument("--format-only", action="store_true", help="only write labelId PNGs for the test server"),
        g.add_argument(
            "--reference-compat",
            action="store_true",
            default=None,
            help="the paper's reference scoring: 21 classes with void as class 0, all averaged, short side 520 "
            "(NOT the Cityscapes benchmark metric)",
        ),
    ]
    return [a.dest for a in actions]


def evaluate_checkpoint(cfg: Config, model: nn.Module, trained: Config, request: EvalRequest) -> dict[str, Any]:
    """Evaluate ``model`` (rebuilt from ``trained``, the checkpoint's config) on ``request.split`` of ``cfg``'s
    data with ``cfg.eval`` and the request's options; returns the report written to ``metrics.json`` (empty on
    processes other than the main one)."""
    opts = request.options
    chosen = {
        "mode": opts.get("mode"),
        "crop_size": opts.get("crop"),
        "stride": opts.get("stride"),
        "scales": opts.get("scales"),
        "flip": opts.get("flip"),
        "batch_size": request.batch_size,
        "reference_compat": opts.get("reference_compat"),
    }
    official, format_only = bool(opts.get("official")), bool(opts.get("format_only"))
    eval_cfg = dataclasses.replace(cfg.eval, **{k: v for k, v in chosen.items() if v is not None})
    if (official or format_only) and (eval_cfg.reference_compat or cfg.data.val_short_side):
        why = "--reference-compat scores" if eval_cfg.reference_compat else f"{request.config_path} validates"
        raise ConfigError(
            f"{why} at short side {cfg.data.val_short_side or 520}; --official and --format-only need full "
            f"resolution: use a benchmark config, e.g. tools/eval.py configs/deeplab_deconv.yaml CHECKPOINT --official"
        )
    predictor = Predictor(
        model, mean=trained.data.mean, std=trained.data.std, mode=eval_cfg.mode, crop_size=eval_cfg.crop_size,
        stride=eval_cfg.stride, scales=eval_cfg.scales, flip=eval_cfg.flip, batch_size=eval_cfg.batch_size,
        device=request.device, fold=request.fold, config=trained,
    )
    # Normalise exactly as the model was trained; the data root and split come from the config.
    data_cfg = dataclasses.replace(cfg.data, mean=trained.data.mean, std=trained.data.std)
    split = request.split
    dataset = CityscapesDataset(
        data_cfg.root, split, transform=build_transforms(data_cfg, train=False), label_mapping=data_cfg.label_mapping
    )
    reference_targets = data_cfg.label_mapping == "reference"
    reference_ids = eval_cfg.reference_compat or reference_targets or outputs_reference_ids(predictor)
    size = f"short side {data_cfg.val_short_side}" if data_cfg.val_short_side else "full resolution"
    if eval_cfg.reference_compat:
        size = "short side 520"
    workers = data_cfg.num_workers if request.num_workers is None else request.num_workers
    loader = build_eval_loader(dataset, batch_size=1, num_workers=workers)

    out_dir = request.out_dir
    pred_dir = out_dir / "pred_labelIds"
    write_pngs = official or format_only
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        if write_pngs and pred_dir.exists():
            shutil.rmtree(pred_dir)  # predictions of an earlier run must not be scored
        print(
            f"evaluating {request.checkpoint} on {data_cfg.root} [{split}]: {len(dataset)} images at {size}, "
            f"mode {eval_cfg.mode}, scales {eval_cfg.scales}, flip {eval_cfg.flip}, "
            f"{world_size()} process(es) on {request.device}"
        )
    barrier(request.device)

    def save_batch(indices, pred: torch.Tensor, _target) -> None:
        for i, p in zip(indices, pred, strict=True):
            p = p.cpu().numpy()
            # The paper's ids back to trainIds; a void prediction becomes 'unlabeled', a miss for the evaluator.
            train_ids = reference_to_train(p) if reference_ids else p.astype("uint8")
            save_label_ids(train_ids, prediction_path(pred_dir, dataset.files[i][0]))

    start = time.perf_counter()
    metrics = evaluate(
        None,
        loader,
        request.device,
        num_classes=NUM_CLASSES,
        predictor=predictor,
        reference_compat=eval_cfg.reference_compat,
        reference_targets=reference_targets,
        progress=True,
        on_batch=save_batch if write_pngs else None,
    )
    elapsed = time.perf_counter() - start
    barrier(request.device)  # every shard's PNGs are written before the official evaluator reads them
    if not is_main_process():
        return {}

    report: dict[str, Any] = {
        "checkpoint": str(request.checkpoint),
        "split": split,
        "eval": to_dict(eval_cfg),
        "seconds": round(elapsed, 2),
    }
    if format_only:
        print(f"wrote {metrics['num_images']} labelId PNGs to {pred_dir} (zip this folder for the test server)")
        report["predictions"] = str(pred_dir)
        return report
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
    if official:
        result = run_official_eval(pred_dir, data_cfg.root, split, json_out=out_dir / "official.json")
        print(format_official(result))
        report["official"] = result
    return report
