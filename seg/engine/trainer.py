"""The iteration-based training loop: build, resume, train with periodic validation and checkpoints.

One function, :func:`train`, serves one process and ``torchrun`` (DDP). The loop reads top to bottom:
data -> model -> optimizer/scheduler/scaler -> resume -> DDP -> iterations (forward, loss, backward, step)
with validation, checkpoints, logging and fault handling between iterations.
"""

from __future__ import annotations

import copy
import hashlib
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from seg.config import Config, dump_yaml, from_dict, to_dict
from seg.engine.checkpoint import (
    BEST,
    LAST,
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    params_finite,
    restore_rng,
    save_checkpoint,
)
from seg.engine.distributed import DistInfo, all_gather_objects
from seg.engine.logger import RunLogger, denormalize, format_seconds, peak_memory_gb
from seg.engine.optim import build_optimizer, build_scheduler
from seg.engine.sampling import ResumableSampler, SeededSamples

DEMO_HINT = (
    "Set data.root (e.g. --opts data.root=/path/to/cityscapes) to a Cityscapes folder, or try the project "
    "without a download: `make demo` generates a synthetic Cityscapes and trains on it."
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; training stopped without saving the broken weights."""


class DataRootError(RuntimeError):
    """The configured dataset is missing or unusable (the dataset's message plus what to do)."""


@dataclass
class TrainResult:
    iteration: int
    best_miou: float | None
    last_val: dict[str, Any] | None
    work_dir: Path
    status: str  # finished | interrupted | paused
    signal_name: str | None = None


# --------------------------------------------------------------------------------------------
# small pieces


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device`` (None: full precision)."""
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs CUDA; on CPU use train.amp=bf16 or none")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def prepare_config(cfg: Config, info: DistInfo) -> Config:
    """A copy of ``cfg`` adjusted to the launch: deconvolution statistics synced across processes."""
    cfg = copy.deepcopy(cfg)
    if info.distributed:
        cfg.model.deconv.sync = True
    return cfg


def fingerprint(module: nn.Module) -> str:
    """A hash of every parameter and buffer: equal on all ranks exactly when their weights are equal."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between iterations (then saves and exits)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def build_datasets(cfg: Config) -> tuple[Any, Any]:
    from seg.data import CityscapesDataset, DatasetError, build_transforms

    try:
        train_set = CityscapesDataset(cfg.data.root, cfg.data.train_split, build_transforms(cfg.data, train=True))
        val_set = CityscapesDataset(cfg.data.root, cfg.data.val_split, build_transforms(cfg.data, train=False))
    except DatasetError as e:
        raise DataRootError(f"{e}\n\n{DEMO_HINT}") from e
    if cfg.train.val_max_images is not None:
        val_set = Subset(val_set, range(min(cfg.train.val_max_images, len(val_set))))
    return train_set, val_set


def _epoch_batches(
    loader: DataLoader, sampler: ResumableSampler, batch_size: int, iteration: int, iters_per_epoch: int
) -> Iterator[Any]:
    """Batches from ``iteration`` on, forever: the position within an epoch follows from the iteration."""
    epoch, done = divmod(iteration, iters_per_epoch)
    while True:
        sampler.set_epoch(epoch, start=done * batch_size)
        yield from loader
        epoch, done = epoch + 1, 0


# --------------------------------------------------------------------------------------------
# the loop


def train(
    cfg: Config,
    info: DistInfo,
    work_dir: str | Path,
    resume: str | Path | bool | None = None,
    show_progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``cfg`` in this process (one rank of ``info``); ``resume=True`` takes ``work_dir``'s latest.

    Raises :class:`NonFiniteLossError` on a NaN/Inf loss (``last.pth`` keeps the last good state) and
    :class:`DataRootError` when the dataset is missing. SIGINT/SIGTERM save ``last.pth`` and return
    with ``status='interrupted'``. ``stop_after=N`` ends the run after iteration N with a checkpoint
    (``status='paused'``) without changing the schedule, so it can be resumed later.
    """
    from seg.evaluation import evaluate
    from seg.inference import Predictor
    from seg.models import build_model

    cfg = prepare_config(cfg, info)
    tc = cfg.train
    work_dir = Path(work_dir)
    cfg.work_dir = str(work_dir)
    device = info.device
    is_main = info.is_main
    log = tqdm.write if is_main else (lambda *_a, **_k: None)

    # The same seed on every rank: identical initial weights (DDP also broadcasts them from rank 0).
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)

    # ---- data
    train_set, val_set = build_datasets(cfg)
    sampler = ResumableSampler(len(train_set), info.world_size, info.rank, shuffle=True, seed=tc.seed)
    iters_per_epoch = sampler.per_rank // tc.batch_size
    if iters_per_epoch < 1:
        raise ValueError(
            f"train.batch_size={tc.batch_size} per process x {info.world_size} processes is more than the "
            f"{len(train_set)} training images of {cfg.data.root}"
        )
    from seg.data import derive_seed, make_generator, worker_init_fn

    nw = cfg.data.num_workers
    loader = DataLoader(
        SeededSamples(train_set),
        batch_size=tc.batch_size,
        sampler=sampler,
        num_workers=nw,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=nw > 0,
        worker_init_fn=worker_init_fn,
        generator=make_generator(tc.seed, info.rank),
    )
    from seg.evaluation import build_eval_loader

    val_loader = build_eval_loader(
        val_set,
        batch_size=cfg.eval.batch_size,
        num_workers=min(nw, 2),
        generator=make_generator(tc.seed, 1000 + info.rank),  # keeps the global torch RNG untouched
    )

    # ---- model, optimizer, schedule
    model = build_model(cfg.model).to(device)  # SyncBatchNorm / synced deconvolution under a process group
    # From here on each rank draws its own stream (e.g. dropout masks differ across ranks, as they should).
    torch.manual_seed(derive_seed(tc.seed, 1, info.rank))
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc)
    amp_dtype = resolve_amp(tc.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # ---- resume
    start_iter, best_miou = 0, None
    ckpt_path: Path | None = None
    if resume is True:
        ckpt_path = latest_checkpoint(work_dir)
        if ckpt_path is None:
            raise FileNotFoundError(f"--resume: no {LAST} in {work_dir} to resume from")
    elif resume:
        ckpt_path = Path(resume)
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_iter = int(ckpt["iteration"])
        best_miou = ckpt.get("best_miou")
        rng = ckpt.get("rng") or []
        if len(rng) == info.world_size:
            restore_rng(rng[info.rank])
        else:
            log(
                f"warning: checkpoint has RNG states of {len(rng)} processes, this run has {info.world_size}; "
                "continuing with fresh random streams"
            )
        old = from_dict(ckpt["config"], str(ckpt_path))
        changed = _diff(to_dict(old), to_dict(cfg))
        if changed:
            log(f"resuming with changed settings: {', '.join(changed)}")
        log(f"resumed from {ckpt_path} at iteration {start_iter}")
        del ckpt

    # ---- run folder
    tb = RunLogger(work_dir, enabled=is_main)
    if is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "config.yaml").write_text(dump_yaml(cfg))
        log(f"run folder: {work_dir}")
        log(
            f"batch: {tc.batch_size} per process x {info.world_size} processes = "
            f"{tc.batch_size * info.world_size} effective; {iters_per_epoch} iterations per epoch of "
            f"{len(train_set)} images; {tc.iterations} iterations; amp: {amp_dtype or 'off'}; device: {device}"
        )

    ddp_model: nn.Module = model
    if info.distributed:
        ddp_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
        )

    def make_state(iteration: int) -> dict[str, Any]:
        rngs = all_gather_objects(capture_rng(), info)  # every rank's streams, so each resumes its own
        return {
            "model": model.state_dict(),
            "config": to_dict(cfg),
            "iteration": iteration,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rngs,
            "best_miou": best_miou,
        }

    def save(iteration: int, best: bool = False) -> None:
        state = make_state(iteration)  # collective: every rank takes part
        if not is_main:
            return
        if not params_finite(model):
            raise NonFiniteLossError(f"weights are not finite at iteration {iteration}; not saving over {LAST}")
        save_checkpoint(state, work_dir / LAST)
        if best:
            save_checkpoint(state, work_dir / BEST)

    def validate(iteration: int) -> dict[str, Any]:
        predictor = Predictor(
            model,
            mean=cfg.data.mean,
            std=cfg.data.std,
            mode=cfg.eval.mode,
            crop_size=cfg.eval.crop_size,
            stride=cfg.eval.stride,
            device=device,
            amp_dtype=amp_dtype,
            batch_size=cfg.eval.batch_size,
        )
        result = evaluate(
            model,
            val_loader,
            device,
            num_classes=cfg.model.num_classes,
            ignore_index=tc.ignore_index,
            predictor=predictor,
        )
        model.train()
        if is_main:
            from seg.data.labels import CLASS_NAMES

            names = CLASS_NAMES if cfg.model.num_classes == len(CLASS_NAMES) else range(cfg.model.num_classes)
            scalars = {"val/mIoU": result["miou"], "val/pixel_acc": result["acc"], "val/mean_acc": result["macc"]}
            scalars.update(
                {f"val_iou/{n}": v for n, v in zip(names, result["iou"], strict=True) if v == v}
            )  # NaN: class absent from the split
            tb.scalars(iteration, scalars)
            tb.record("val", iteration, miou=result["miou"], acc=result["acc"], macc=result["macc"], iou=result["iou"])
            _log_images(tb, iteration, predictor, val_set, cfg)
            log(f"val @ {iteration}: mIoU {100 * result['miou']:.2f}  pixel acc {100 * result['acc']:.2f}")
        return result

    # ---- loop
    stop = StopRequest()
    stop.install()
    batches = _epoch_batches(loader, sampler, tc.batch_size, start_iter, iters_per_epoch)
    bar = tqdm(
        total=tc.iterations,
        initial=start_iter,
        desc="train",
        dynamic_ncols=True,
        mininterval=1.0,
        disable=not (is_main and show_progress),
    )
    last_val: dict[str, Any] | None = None
    iteration = start_iter
    status, signal_name = "finished", None
    t_start, timed_from = time.perf_counter(), start_iter
    data_time = iter_time = 0.0
    model.train()
    try:
        while iteration < tc.iterations:
            t0 = time.perf_counter()
            images, masks = next(batches)
            images = images.to(device, non_blocking=True)
            masks = masks.to(device, non_blocking=True).long()
            t1 = time.perf_counter()

            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = ddp_model(images)
                loss = F.cross_entropy(out["out"].float(), masks, ignore_index=tc.ignore_index)
                if "aux" in out and tc.aux_weight > 0:
                    loss = loss + tc.aux_weight * F.cross_entropy(
                        out["aux"].float(), masks, ignore_index=tc.ignore_index
                    )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()

            # One small all-reduce per iteration makes every rank agree on the loss and on a stop request.
            flags = torch.stack([loss.detach().float(), torch.tensor(float(stop.signum is not None), device=device)])
            if info.distributed:
                dist.all_reduce(flags)
            loss_value = flags[0].item() / info.world_size
            if not np.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"loss is {loss_value} at iteration {iteration + 1}; stopped before the optimizer step. "
                    f"{work_dir / LAST} (if any) holds the last good state. Lower train.lr, set "
                    "train.grad_clip, or check the data."
                )
            if tc.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            iteration += 1
            t2 = time.perf_counter()

            # Exponential averages for display; the first iterations (warm-up) are excluded from the ETA.
            data_time = 0.9 * data_time + 0.1 * (t1 - t0) if iteration > start_iter + 1 else t1 - t0
            iter_time = 0.9 * iter_time + 0.1 * (t2 - t0) if iteration > start_iter + 1 else t2 - t0
            if iteration == start_iter + 2:
                t_start, timed_from = time.perf_counter(), iteration
            bar.update(1)
            if iteration % tc.log_interval == 0 or iteration == tc.iterations:
                lr = optimizer.param_groups[0]["lr"]
                mem, kind = peak_memory_gb(device)
                done = iteration - timed_from
                per_iter = (time.perf_counter() - t_start) / done if done > 0 else iter_time
                eta = per_iter * (tc.iterations - iteration)
                bar.set_postfix(
                    loss=f"{loss_value:.4f}",
                    lr=f"{lr:.2e}",
                    data=f"{data_time:.3f}s",
                    it=f"{iter_time:.3f}s",
                    mem=f"{mem:.2f}G",
                )
                log(
                    f"iter {iteration}/{tc.iterations}  loss {loss_value:.4f}  lr {lr:.3e}  data {data_time:.3f}s  "
                    f"iter {iter_time:.3f}s  eta {format_seconds(eta)}  mem({kind}) {mem:.2f}G"
                )
                tb.scalars(
                    iteration,
                    {"train/loss": loss_value, "train/lr": lr, "time/data": data_time, "time/iter": iter_time},
                )
                tb.record("train", iteration, loss=loss_value, lr=lr, data_time=data_time, iter_time=iter_time)

            stop_now = flags[1].item() > 0
            is_val = iteration % tc.val_interval == 0 or iteration == tc.iterations
            improved = False
            if is_val and not stop_now:
                last_val = validate(iteration)
                if best_miou is None or last_val["miou"] > best_miou:
                    best_miou, improved = last_val["miou"], True
            pause = stop_after is not None and iteration >= stop_after and iteration < tc.iterations
            if stop_now or pause or is_val or iteration % tc.checkpoint_interval == 0 or iteration == tc.iterations:
                save(iteration, best=improved)
            if pause and not stop_now:
                status = "paused"
                log(f"paused after iteration {iteration}; saved {work_dir / LAST}")
                break
            if stop_now:
                status = "interrupted"
                signal_name = signal.Signals(stop.signum).name if stop.signum else "a signal on another rank"
                log(
                    f"stopped by {signal_name} at iteration {iteration}; saved {work_dir / LAST}. "
                    "Continue with --resume."
                )
                break
        if status == "finished" and info.distributed:
            # DDP keeps replicas equal; a mismatch here would mean unsynchronised buffers (e.g. statistics).
            prints = all_gather_objects(fingerprint(model), info)
            log(f"weights identical on all {info.world_size} processes: {'yes' if len(set(prints)) == 1 else 'NO'}")
            tb.record("final", iteration, fingerprints=prints)
    finally:
        bar.close()
        stop.restore()
        tb.close()

    return TrainResult(iteration, best_miou, last_val, work_dir, status, signal_name)


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb and k != "work_dir":
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


@torch.no_grad()
def _log_images(tb: RunLogger, iteration: int, predictor: Any, val_set: Any, cfg: Config) -> None:
    """Input, ground truth and prediction of the first validation image, in the Cityscapes palette."""
    from seg.visualize import colorize

    image, mask = val_set[0]
    pred = predictor.predict_tensor(image[None])[0].cpu().numpy()
    gt = np.asarray(mask, dtype=np.int64)
    tb.images(
        iteration,
        {
            "val/input": denormalize(image, cfg.data.mean, cfg.data.std),
            "val/ground_truth": colorize(gt),
            "val/prediction": colorize(pred),
        },
    )
