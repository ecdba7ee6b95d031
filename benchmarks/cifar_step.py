"""The paper's CIFAR Table 1 networks, BN against ND: the cost of one training step of each, side by side.

    python benchmarks/cifar_step.py [--arch vgg16 resnet18 ...] [--batch 128] [--threads 2] [--warmup 1]
                                    [--repeats 3] [--device cpu|cuda] [--out benchmarks/results/cifar_step_cpu.md]

For every network (default: all of :data:`TABLE1`) it builds two models through the project's own path,
``configs/cifar10/base.yaml`` with overrides (as ``tools/train.py --opts`` would) and the classification task's
``build_model``: BN (``model.norm=bn model.block_fc=0``, the reference's ``--deconv False --num-groups-final 0``)
and ND (``model.norm=deconv model.block_fc=512``, ``--deconv True --num-groups-final 512``, with base.yaml's
CIFAR ``model.deconv`` defaults), each from the recipe's seed. It then times a training step on a fixed random
batch B×3×32×32 with random labels: forward, the task's loss (cross-entropy), backward, and an SGD step of the
project's optimizer with the recipe's learning rate, momentum and weight decay; float32, as the recipe
(``train.amp: none``). After ``--warmup`` steps of each, ``--repeats`` repetitions of BN and ND are interleaved,
alternating which goes first, so that machine noise hits both alike; the table gives the median seconds and
the ratio ND/BN of the medians with, in brackets, the smallest and largest ratio of the paired repetitions.
On CUDA the device is synchronised around every timed step.

The markdown (machine, torch version, threads, load average at the start and the end, date, the table) is
printed and, with ``--out FILE``, written there too (rewritten after every network, so an interrupted run
keeps what it measured). A bad ``--arch`` is a one-line ``error:`` and exit code 2.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# Run as a script from the repository root or from benchmarks/: make ``seg`` importable either way.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import interleaved_samples, select_device  # noqa: E402  (benchmarks/common.py)
from machine_info import cpu_model  # noqa: E402  (benchmarks/machine_info.py)

from seg.config import Config, ConfigError, load_config  # noqa: E402
from seg.engine.optim import build_optimizer  # noqa: E402
from seg.models.cifar_zoo import ZOO_ARCHS  # noqa: E402
from seg.tasks import build_task  # noqa: E402

BASE_CONFIG = REPO / "configs" / "cifar10" / "base.yaml"
# The paper's Table 1 networks (model.arch), in its order: VGG-16, ResNet-18, then the seg.models.cifar_zoo ones.
TABLE1: tuple[str, ...] = ("vgg16", "resnet18", *ZOO_ARCHS)
# The two models of each row: name -> config overrides (the reference's --deconv / --num-groups-final).
NORMS: dict[str, list[str]] = {
    "BN": ["model.norm=bn", "model.block_fc=0"],
    "ND": ["model.norm=deconv", "model.block_fc=512"],
}
HEADER = ("| network | params BN | params ND | train BN (s) | train ND (s) | ratio ND/BN (paired min–max) |\n"
          "|---|---|---|---|---|---|")


def model_config(arch: str, norm: str) -> Config:
    """The recipe's config (base.yaml) for one network and norm."""
    return load_config(BASE_CONFIG, [f"model.arch={arch}", *NORMS[norm]])


class TrainStep:
    """One training step of the classification task's model on a fixed batch (every repetition does the same
    work): forward, the task's loss, backward, the project's SGD step."""

    def __init__(self, cfg: Config, x: torch.Tensor, target: torch.Tensor, device: torch.device) -> None:
        torch.manual_seed(cfg.train.seed)  # as the trainer: the recipe's seed before the build
        self.task = build_task(cfg)
        self.model: nn.Module = self.task.build_model().to(device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.x, self.target = x, target

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def __call__(self) -> None:
        self.model.train()
        loss = self.task.loss(self.model(self.x), self.target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def random_batch(batch: int, num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    target = torch.randint(0, num_classes, (batch,), generator=gen)
    return x.to(device), target.to(device)


def bench(arch: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Parameters of both models and the seconds of every repetition of their training steps."""
    cfgs = {n: model_config(arch, n) for n in NORMS}
    x, target = random_batch(args.batch, cfgs["BN"].model.num_classes, device)
    steps = {n: TrainStep(cfg, x, target, device) for n, cfg in cfgs.items()}
    samples = interleaved_samples(steps, device, args.warmup, args.repeats)
    return {"params": {n: s.params() for n, s in steps.items()}, "samples": samples}


def table_row(arch: str, r: dict) -> str:
    bn, nd = r["samples"]["BN"], r["samples"]["ND"]
    paired = [a / b for a, b in zip(nd, bn)]  # repetition r of ND ran next to repetition r of BN
    median_bn, median_nd = statistics.median(bn), statistics.median(nd)
    return (f"| {arch} | {r['params']['BN']:,} | {r['params']['ND']:,} | {median_bn:.3f} | {median_nd:.3f} | "
            f"{median_nd / median_bn:.2f}x ({min(paired):.2f}–{max(paired):.2f}x) |")


def device_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA, {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return "CPU"


def preamble(args: argparse.Namespace, device: torch.device) -> list[str]:
    """What a reader needs to compare this table with another: machine, software, workload, load."""
    return [
        "# CIFAR Table 1 networks: training step, BN vs ND",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {cpu_model()} ({os.cpu_count()} logical CPUs); device {device_text(device)}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {torch.get_num_threads()} threads",
        f"- step: batch {args.batch}×3×32×32, random inputs and labels, float32; forward, cross-entropy, backward, "
        "SGD step (configs/cifar10/base.yaml: lr, momentum, weight decay)",
        f"- BN: {' '.join(NORMS['BN'])}; ND: {' '.join(NORMS['ND'])} (base.yaml's model.deconv)",
        f"- {args.repeats} timed repetition(s) after {args.warmup} warm-up step(s), BN and ND interleaved "
        "(alternating which goes first); median seconds; the ratio is of the medians, in brackets the smallest "
        "and largest paired ratio",
        f"- command: python benchmarks/cifar_step.py {' '.join(args.argv)}".rstrip(),
        f"- load average (1 min) at start: {os.getloadavg()[0]:.2f}",
        "",
        HEADER,
    ]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(TABLE1), metavar="ARCH",
                        help=f"networks (model.arch) to time; default all of Table 1: {' '.join(TABLE1)}")
    parser.add_argument("--batch", type=int, default=128, help="batch size (the recipe's 128)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each model first")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps of each model")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", type=Path, metavar="FILE", help="also write the markdown to FILE")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # for the record of the command
    return args, parser


def check_args(args: argparse.Namespace) -> str | None:
    """Why the arguments cannot run (None: they can)."""
    unknown = [a for a in args.arch if a not in TABLE1]
    if unknown:
        return f"--arch {' '.join(unknown)}: not a Table 1 network; choose from {' '.join(TABLE1)}"
    # BatchNorm in training mode needs more than one value per channel (some layers see 1×1 maps).
    if args.batch < 2 or args.threads < 1 or args.repeats < 1 or args.warmup < 0:
        return "--batch must be at least 2, --threads and --repeats at least 1, --warmup at least 0"
    return None


def run(args: argparse.Namespace, device: torch.device, emit: Callable[[str], None]) -> list[str]:
    """Time every network, emitting each line as it is known; the whole markdown, line by line."""
    lines = preamble(args, device)
    for line in lines:
        emit(line)
    for arch in dict.fromkeys(args.arch):  # each network once, in the order given
        lines.append(table_row(arch, bench(arch, args, device)))
        emit(lines[-1])
        gc.collect()  # the two models of a row go before the next row's are built
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.out is not None:
            args.out.write_text("\n".join(lines) + "\n")
    for line in ("", f"Load average (1 min) at end: {os.getloadavg()[0]:.2f}"):
        lines.append(line)
        emit(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    args, parser = parse_args(argv)
    problem = check_args(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.out is not None and not args.out.parent.is_dir():
        print(f"error: --out {args.out}: folder {args.out.parent} does not exist", file=sys.stderr)
        return 2
    device, _ = select_device(parser, args.device, args.threads)
    try:
        lines = run(args, device, lambda line: print(line, flush=True))
    except ConfigError as e:  # a network the config or the builder refuses: say which, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
