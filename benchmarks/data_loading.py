"""Data-loading throughput: images/s through the training augmentation, for several worker counts.

    python benchmarks/data_loading.py [--root DIR] [--workers 0 1 2] [--size 1024 2048] [--batch 2]

Without ``--root`` a small synthetic Cityscapes at ``--size`` (default the real 1024x2048) is generated
into a temporary directory. Each loader reads PNGs, decodes them and applies the training pipeline of
``seg.data.build_transforms`` (random scale, pad, crop to ``--crop``, flip, colour jitter, normalise).
The clock starts after the first batch, so worker start-up is not counted; images/s is the steady state.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seg.config import DataConfig  # noqa: E402
from seg.data import CityscapesDataset, build_transforms, make_generator, worker_init_fn  # noqa: E402
from seg.data.synthetic import generate  # noqa: E402


def throughput(root: Path, workers: int, batch: int, batches: int, crop: list[int]) -> float:
    """Images per second over ``batches`` batches, after one batch of warm-up."""
    cfg = DataConfig(root=str(root), crop_size=list(crop), num_workers=workers)
    dataset = CityscapesDataset(root, "train", transform=build_transforms(cfg, train=True, seed=0))
    # Sampling with replacement lets a small generated set feed any number of batches.
    sampler = RandomSampler(dataset, replacement=True, num_samples=batch * (batches + 1),
                            generator=make_generator(0))
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                        worker_init_fn=worker_init_fn, generator=make_generator(0), drop_last=True)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    count = sum(images.shape[0] for images, _ in it)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="an existing Cityscapes-layout dataset (default: generate one)")
    parser.add_argument("--images", type=int, default=8, help="images to generate when --root is not given")
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"),
                        help="size of the generated images")
    parser.add_argument("--crop", type=int, nargs=2, default=DataConfig().crop_size, metavar=("H", "W"))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per worker count")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process only collates; leave the cores to the workers
    with tempfile.TemporaryDirectory(prefix="synthetic-cityscapes-") as tmp:
        root = args.root
        if root is None:
            start = time.perf_counter()
            root = generate(tmp, train=args.images, val=0, test=0, height=args.size[0], width=args.size[1],
                            video_frames=0)
            print(f"generated {args.images} images of {args.size[0]}x{args.size[1]} in "
                  f"{time.perf_counter() - start:.1f} s")
        print(f"root={root} crop={args.crop[0]}x{args.crop[1]} batch={args.batch} batches={args.batches} "
              f"cpus={os.cpu_count()} loadavg={os.getloadavg()[0]:.2f}")
        print("| workers | images/s |\n|---|---|")
        for workers in args.workers:
            rate = throughput(root, workers, args.batch, args.batches, args.crop)
            print(f"| {workers} | {rate:.2f} |", flush=True)


if __name__ == "__main__":
    main()
