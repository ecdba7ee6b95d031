"""Export a checkpoint's model (deconvolution folded) to TorchScript or ONNX and check it against eager.

    python tools/export.py CONFIG CHECKPOINT --format torchscript|onnx [--out FILE] [--size H W]

The exported model takes a normalised image batch N,3,H,W (any H, W; mean/std of the checkpoint's data
config) and returns logits N,19,H,W. After exporting, the file is run on two inputs of different sizes
next to the eager model and the largest difference is printed. ONNX needs `pip install -e '.[onnx]'`.

Exit codes (the README's table, seg/errors.py): 0 exported and within --atol of eager; 1 exported but the
difference exceeds --atol; 2 nothing exported: bad arguments or config, missing or unusable checkpoint, missing
ONNX packages, or a failed export (one line `error: <message>` on stderr naming the key or file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from seg.config import ConfigError, load_config
from seg.errors import EXIT_FAILED, EXIT_USER_ERROR, UserError, error_message
from seg.export import (
    FORMATS,
    compare,
    export_onnx,
    export_torchscript,
    prepare,
    run_onnx,
    run_torchscript,
)
from seg.inference import load_checkpoint_model
from seg.tasks import untrained_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (checked for validity; the model comes from the checkpoint)")
    p.add_argument("checkpoint", help="training checkpoint (.pth)")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--out", help="output file (default: next to the checkpoint, .ts.pt or .onnx)")
    p.add_argument("--size", nargs=2, type=int, default=[512, 1024], metavar=("H", "W"), help="example input")
    p.add_argument("--atol", type=float, default=1e-3, help="largest accepted difference to eager")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if min(args.size) < 8:
        print(f"error: --size {args.size[0]} {args.size[1]}: expected H and W of at least 8", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        load_config(args.config)
        model, _ = load_checkpoint_model(args.checkpoint, "cpu", build=untrained_model)
        wrapped = prepare(model)
        h, w = args.size
        suffix = ".ts.pt" if args.format == "torchscript" else ".onnx"
        out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(suffix)
        sample = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
        # A second input of another size (not a multiple of the output stride) checks the dynamic shape.
        other = torch.randn(2, 3, h - h // 4 + 3, w - w // 4 + 5, generator=torch.Generator().manual_seed(1))
        if args.format == "torchscript":
            path, dynamic, run = export_torchscript(wrapped, sample, out), True, run_torchscript
        else:
            (path, dynamic), run = export_onnx(wrapped, sample, out), run_onnx
        diff = compare(wrapped, run, path, [sample, other] if dynamic else [sample])
    except (UserError, ConfigError, OSError) as e:  # OSError: e.g. an --out folder that cannot be written
        print(f"error: {error_message(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    shapes = "dynamic N, H, W" if dynamic else f"fixed input 1x3x{h}x{w}"
    print(f"exported {args.format} -> {path} ({shapes}); max |export - eager| = {diff:.3g}")
    if diff > args.atol:
        print(f"error: difference {diff:.3g} exceeds --atol {args.atol}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
