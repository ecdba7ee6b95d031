"""`make demo`: synthetic Cityscapes -> train configs/demo.yaml on CPU -> evaluate -> colored masks and video.

    python tools/demo.py [--retrain] [--work-dir checkpoints/demo] [--opts KEY=VALUE ...]

Generates datasets/synthetic_cityscapes when missing, trains (a few minutes on 2 CPU cores; a finished
run in the work dir is reused unless --retrain), scores the val split, writes colored masks and overlays
for a few val images and, when tools/infer.py is present, a colored version of the synthetic video.

Exit codes (the README's table, seg/errors.py): 0 done; 1 the video inference failed (everything else is done);
2 a bad --opts override; 128 + signal number when training was stopped by SIGINT/SIGTERM (it saved first).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from seg.checkpoint import latest_checkpoint, load_checkpoint
from seg.config import ConfigError, load_config
from seg.data import CityscapesDataset, build_transforms
from seg.data.labels import CLASS_NAMES
from seg.data.synthetic import VIDEO_NAME, generate
from seg.engine import DistInfo, train
from seg.errors import EXIT_FAILED, EXIT_OK, EXIT_SIGNAL_BASE, EXIT_USER_ERROR
from seg.evaluation import build_eval_loader, evaluate, format_table
from seg.inference import Predictor
from seg.media import write_image
from seg.visualize import colorize, overlay, titled_row

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
NUM_MASKS = 4
STEPS = 6  # 1 install (make), 2 data, 3 training, 4 evaluation, 5 masks, 6 video


def step(k: int, what: str) -> None:
    """One line that tells a waiting user where the demo is."""
    print(f"\n[demo {k}/{STEPS}] {what}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=REPO / "checkpoints" / "demo")
    p.add_argument("--retrain", action="store_true", help="train again even if a finished run exists")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides of configs/demo.yaml (e.g. a shorter run: train.iterations=50)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(CONFIG, args.opts)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    root = Path(cfg.data.root)
    if not root.is_absolute():
        root = REPO / root
        cfg.data.root = str(root)
    work_dir: Path = args.work_dir
    t0 = time.time()

    # 1. data
    if not (root / "leftImg8bit" / cfg.data.val_split).is_dir():
        step(2, f"generating the synthetic Cityscapes in {root} ...")
        generate(root, train=40, val=10, test=5, height=256, width=512, seed=0)
    else:
        step(2, f"synthetic Cityscapes found in {root}")

    # 2. training (reused when a finished run is already there)
    last = latest_checkpoint(work_dir)
    finished = last is not None and load_checkpoint(last)["iteration"] >= cfg.train.iterations
    if finished and not args.retrain:
        step(3, f"training: reusing the finished run in {work_dir} (--retrain to train again)")
    else:
        step(3, f"training {cfg.train.iterations} iterations on CPU into {work_dir} (the bar shows the ETA; Ctrl-C "
                "stops, `make demo` continues)")
        resume = last is not None and not args.retrain
        result = train(cfg, DistInfo(0, 1, 0, torch.device("cpu")), work_dir, resume=resume)
        if result.status != "finished":
            print(f"training stopped at iteration {result.iteration}; run `make demo` again to continue")
            return EXIT_SIGNAL_BASE + int(getattr(signal, result.signal_name or "SIGINT", signal.SIGINT))
    t_train = time.time() - t0

    # 3. evaluation of the best checkpoint on the val split
    step(4, "evaluating the best checkpoint on the val split")
    ckpt = work_dir / "best.pth"
    predictor = Predictor.from_checkpoint(ckpt, device="cpu", eval_cfg=cfg.eval)
    val_set = CityscapesDataset(root, cfg.data.val_split, build_transforms(cfg.data, train=False))
    metrics = evaluate(None, build_eval_loader(val_set, batch_size=2, num_workers=0), "cpu", predictor=predictor)
    iou_table = format_table(metrics, CLASS_NAMES, title=f"synthetic val ({len(val_set)} images), {ckpt.name}")
    print(iou_table)
    iou_file = work_dir / "val_iou.txt"
    iou_file.write_text(iou_table + "\n")

    # 4. per val image: input | ground truth | prediction, and the colored mask and overlay
    step(5, f"writing input | ground truth | prediction for {NUM_MASKS} val images")
    mask_dir = work_dir / "masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    for index in range(min(NUM_MASKS, len(val_set))):
        image, truth_ids = val_set.load(index)  # the mask in trainIds, whichever label file the set holds
        color = colorize(np.asarray(predictor(image)))
        truth = colorize(truth_ids)
        stem = Path(val_set.files[index][0]).name.replace("_leftImg8bit.png", "")
        write_image(mask_dir / f"{stem}_compare.png", titled_row([image, truth, color],
                                                                 ["input", "ground truth", "prediction"]))
        write_image(mask_dir / f"{stem}_color.png", color)
        write_image(mask_dir / f"{stem}_overlay.png", overlay(image, color, 0.5))

    # 5. the synthetic video, colored by tools/infer.py
    video_out, video_failed = None, False
    infer = REPO / "tools" / "infer.py"
    video = root / VIDEO_NAME
    if infer.is_file() and video.is_file():
        step(6, f"coloring the synthetic video {video.name} with tools/infer.py")
        video_out = work_dir / "video"
        cmd = [
            sys.executable,
            str(infer),
            str(CONFIG),
            str(ckpt),
            str(video),
            "--out",
            str(video_out),
            "--device",
            "cpu",
        ]
        video_failed = subprocess.run(cmd, cwd=REPO).returncode != 0

    print("\n" + "=" * 72)
    print(f"demo finished in {time.time() - t0:.0f} s (training {t_train:.0f} s)")
    print(
        f"val mIoU (19 classes, synthetic set): {100 * metrics['miou']:.1f}%   "
        f"pixel accuracy: {100 * metrics['acc']:.1f}%"
    )
    print(f"run folder:   {work_dir}  (checkpoints, config.yaml, TensorBoard: tensorboard --logdir {work_dir})")
    print(f"checkpoint:   {ckpt}")
    print(f"IoU table:    {iou_file}")
    print(f"comparisons:  {mask_dir}/*_compare.png  (input | ground truth | prediction)")
    print(f"masks:        {mask_dir}/*_color.png, *_overlay.png")
    if video_out is not None and not video_failed:
        print(f"video:        {video_out}")
    print(f"dataset:      {root}")
    if video_failed:
        print(f"error: video inference of {video} failed (see above); everything else is done", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
