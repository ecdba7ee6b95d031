"""Segment images and videos with a trained checkpoint.

    python tools/infer.py CONFIG CHECKPOINT INPUT... [--out DIR] [--opacity 0.5] [--save mask,color,overlay]
                          [--batch-size N] [--device cpu|cuda] [--mode whole|slide]

INPUT: image files, folders, glob patterns (quote them) or videos (.mp4, .avi, .mov, ...). Images give
<name>_mask.png (raw trainIds 0..18), <name>_color.png (Cityscapes palette) and <name>_overlay.png;
videos give <name>_seg.mp4 at the same frame rate and size (overlay, or --video-layout side for the
colour mask next to it).

Exit codes (the README's table, seg/errors.py): 0 every input segmented; 1 some inputs failed (an unreadable or
missing image or video, a video that cannot be written; each is reported as `error: <message naming the file>`,
the others are still processed); 2 nothing usable: bad arguments, config or --opts key, missing or unusable
checkpoint, unavailable device, or an image output folder that cannot be written.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import seg.tasks  # noqa: F401  (importing it registers every task's config rules)
from seg.config import ConfigError, load_config
from seg.errors import EXIT_FAILED, EXIT_USER_ERROR, UserError, error_message
from seg.inference import Predictor
from seg.media import MediaError, expand_inputs, is_video
from seg.visualize import SAVE_KINDS, segment_images, segment_video


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (eval settings: mode, crop, stride, scales, flip)")
    p.add_argument("checkpoint", help="training checkpoint (.pth); its stored config rebuilds the model")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image, folder, glob pattern or video")
    p.add_argument("--out", help="output folder (default: <checkpoint folder>/infer)")
    p.add_argument("--opacity", type=float, default=0.5, help="colour mask opacity in overlays (0..1)")
    p.add_argument(
        "--save", default=",".join(SAVE_KINDS), help="image outputs, comma-separated: mask,color,overlay"
    )
    p.add_argument("--video-layout", choices=("overlay", "side"), default="overlay", help="video frames")
    p.add_argument(
        "--batch-size", type=int, help="images or frames per forward pass (default: eval.batch_size)"
    )
    p.add_argument("--mode", choices=("whole", "slide"), help="inference mode (default: eval.mode)")
    p.add_argument("--scales", nargs="+", type=float, help="test-time scales")
    p.add_argument("--flip", action="store_true", default=None, help="add horizontally flipped views")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: CUDA when available")
    p.add_argument("--no-fold", action="store_true", help="keep deconvolution layers unfolded")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    save = [s.strip() for s in args.save.split(",") if s.strip()]
    unknown = [s for s in save if s not in SAVE_KINDS]
    if unknown or not save:
        print(f"error: --save {args.save!r}: expected some of {','.join(SAVE_KINDS)}", file=sys.stderr)
        return EXIT_USER_ERROR
    if not 0.0 <= args.opacity <= 1.0:
        print(f"error: --opacity {args.opacity}: expected a value in [0, 1]", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        cfg = load_config(args.config, args.opts)
        chosen = {"mode": args.mode, "scales": args.scales, "flip": args.flip, "batch_size": args.batch_size}
        eval_cfg = dataclasses.replace(cfg.eval, **{k: v for k, v in chosen.items() if v is not None})
        predictor = Predictor.from_checkpoint(
            args.checkpoint, eval_cfg=eval_cfg, device=args.device, fold=not args.no_fold
        )
        errors = segment_all(predictor, args, save)
    except (UserError, ConfigError, OSError) as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    if errors:
        print(f"{len(errors)} input(s) failed", file=sys.stderr)
        return EXIT_FAILED
    return 0


def segment_all(predictor: Predictor, args: argparse.Namespace, save: list[str]) -> list[str]:
    """Segment every input; returns one message per input that could not be read (already printed)."""
    files, errors = expand_inputs(args.inputs)
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "infer"
    images = [(p, s) for p, s in files if not is_video(p)]
    videos = [(p, s) for p, s in files if is_video(p)]

    def report(message: str) -> None:
        errors.append(message)
        print(f"error: {message}", file=sys.stderr)

    if images:
        n = segment_images(predictor, images, out, save, args.opacity, on_error=report)
        print(f"{n} image(s) segmented -> {out} ({', '.join(f'<name>_{k}.png' for k in save)})")
    for path, stem in videos:
        try:
            stats = segment_video(predictor, path, out / f"{stem}_seg.mp4", args.video_layout, args.opacity)
        except MediaError as e:
            report(str(e))
            continue
        print(
            f"{path} -> {stats.output}: {stats.frames} frames "
            f"{stats.size[0]}x{stats.size[1]} at {stats.fps:g} fps; "
            f"model {stats.model_fps:.1f} frames/s, end-to-end {stats.end_to_end_fps:.1f} frames/s "
            f"on {predictor.device}"
        )
    return errors


if __name__ == "__main__":
    sys.exit(main())
