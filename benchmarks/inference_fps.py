"""Inference frames per second at full Cityscapes resolution: BN model against folded deconvolution model.

    python benchmarks/inference_fps.py [--device cpu|cuda] [--arch deeplabv3] [--os 8 16] [--size 1024 2048]
                                       [--frames 2] [--threads 2] [--encoder resnet50] [--check-args]

Both models go through ``seg.inference.Predictor`` in ``whole`` mode (one pass per frame, trainId map out,
bf16 autocast on CUDA); the deconvolution model with ``fold=True`` (every ``FastDeconv`` replaced by a plain
convolution). Frames are timed one by one after warm-up, BN and deconvolution interleaved; FPS = 1 / median.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import interleaved, select_device  # noqa: E402  (benchmarks/common.py)

from seg.config import ConfigError, ModelConfig  # noqa: E402
from seg.inference import Predictor  # noqa: E402
from seg.models import build_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--arch", nargs="+", default=["deeplabv3"], choices=("deeplabv3", "deeplabv3plus", "fcn"))
    parser.add_argument("--os", nargs="+", type=int, default=[16, 8], choices=(8, 16), help="output strides")
    parser.add_argument("--encoder", default="resnet50")
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--frames", type=int, default=2, help="timed frames per model")
    parser.add_argument("--check-args", action="store_true",
                        help="check the arguments, print what would run (JSON) and exit, touching no device")
    args = parser.parse_args(argv)
    if args.frames < 1 or args.warmup < 0 or args.threads < 1 or min(args.size) < 1:
        parser.error("--frames, --threads and --size must be positive, --warmup at least 0")
    from seg.models.build import _check_encoder  # the builder's own check (smp or tu-<timm> names)

    try:
        _check_encoder(args.encoder)
    except ConfigError as e:
        parser.error(f"--encoder: {e}")
    return args, parser


def main() -> None:
    args, parser = parse_args()
    if args.check_args:
        print(json.dumps({k: v for k, v in vars(args).items() if k != "check_args"}))
        return
    device, name = select_device(parser, args.device, args.threads)
    print(f"device={device} ({name}) encoder={args.encoder} frame=1x3x{args.size[0]}x{args.size[1]} "
          f"warmup={args.warmup} frames={args.frames} torch={torch.__version__} loadavg={os.getloadavg()[0]:.2f}")
    print("| model | OS | BN (FPS) | deconv folded (FPS) | deconv/BN time |\n|---|---|---|---|---|", flush=True)
    amp = torch.bfloat16 if device.type == "cuda" else None
    frame = torch.randn(1, 3, *args.size, generator=torch.Generator().manual_seed(0))
    for arch in args.arch:
        for output_stride in args.os:
            predictors = {}
            for norm in ("bn", "deconv"):
                torch.manual_seed(0)
                model = build_model(ModelConfig(arch=arch, encoder=args.encoder, output_stride=output_stride,
                                                norm=norm)).eval()
                predictors[norm] = Predictor(model, mode="whole", device=device, amp_dtype=amp,
                                             fold=norm == "deconv")
            fns = {norm: (lambda p=p: p.predict_tensor(frame)) for norm, p in predictors.items()}
            t = interleaved(fns, device, args.warmup, args.frames)
            bn, dc = t["bn"], t["deconv"]
            print(f"| {arch} {args.encoder} | {output_stride} | {1 / bn:.3f} | {1 / dc:.3f} | {dc / bn:.2f}x |",
                  flush=True)
            del predictors
    print(f"loadavg at end={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
