"""The iteration-based training loop, the same for every task, in one process or under ``torchrun`` (DDP).

:func:`train` reads top to bottom: build the run (task, data, model, optimizer, checkpointer, writers),
resume, then iterate :func:`train_step`, with :func:`validate`, checkpoints and stop requests between
iterations. What is specific to segmentation or classification lives in the task (:mod:`seg.tasks`).
"""

from __future__ import annotations

import hashlib
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from seg.checkpoint import LAST
from seg.config import Config, ConfigError, TrainConfig, dump_yaml, to_dict
from seg.data import derive_seed, make_generator, worker_init_fn
from seg.engine.checkpointer import Checkpointer, NonFiniteLossError
from seg.engine.distributed import DistInfo, all_gather_objects
from seg.engine.optim import build_optimizer, build_scheduler
from seg.engine.sampling import ResumableSampler, SeededSamples
from seg.engine.writers import ConsoleWriter, Writer, build_writers, format_seconds, peak_memory_gb
from seg.evaluation import build_eval_loader
from seg.events import Event
from seg.tasks import Task, build_task


@dataclass
class TrainResult:
    iteration: int
    best_metric: float | None  # the task's metric (segmentation: mIoU), best over validations
    last_val: dict[str, Any] | None
    work_dir: Path
    status: str  # finished | interrupted | paused
    signal_name: str | None = None


@dataclass
class Run:
    """Everything one training run works with, built once by :func:`build_run`."""

    cfg: Config
    info: DistInfo
    task: Task
    model: nn.Module  # the plain model: checkpoints and validation
    ddp_model: nn.Module  # what the training step calls (the model itself in one process)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    loader: DataLoader
    sampler: ResumableSampler
    val_loader: DataLoader
    checkpointer: Checkpointer
    log: Callable[[str], None]

    @property
    def iters_per_epoch(self) -> int:
        return self.sampler.per_rank // self.cfg.train.batch_size


def train(
    cfg: Config,
    info: DistInfo,
    work_dir: str | Path,
    resume: str | Path | bool | None = None,
    show_progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``cfg`` in this process (one rank of ``info``); ``resume=True`` takes ``work_dir``'s ``last.pth``.

    Raises :class:`NonFiniteLossError` on a NaN/Inf loss (``last.pth`` keeps the last good state) and the
    task's ``DataRootError`` when the dataset is missing. SIGINT/SIGTERM save ``last.pth`` and return with
    ``status='interrupted'``. ``stop_after=N`` ends the run after iteration N with a checkpoint
    (``status='paused'``) without changing the schedule, so it can be resumed later.
    """
    run = build_run(cfg, info, Path(work_dir))
    tc, ckpt = cfg.train, run.checkpointer
    path = ckpt.find(resume)
    start = ckpt.resume(path) if path is not None else 0
    timer = StepTimer(ckpt.train_seconds)
    console = ConsoleWriter(tc.iterations, start, show_progress) if info.is_main else None
    writers = build_writers(ckpt.work_dir, console)
    announce(run, ckpt.work_dir)
    stop = StopRequest()
    batches = epoch_batches(run, start)
    iteration, status, last_val = start, "finished", None
    stop.install()
    run.model.train()
    try:
        while iteration < tc.iterations:
            try:
                loss, stop_now = train_step(run, batches, stop.requested, iteration + 1, timer)
            except NonFiniteLossError as e:
                emit(writers, Event("diverged", iteration + 1, {"message": str(e)}))
                raise
            iteration += 1
            ckpt.train_seconds = timer.total
            if console is not None:
                console.advance()
            if iteration % tc.log_interval == 0 or iteration == tc.iterations:
                emit(writers, train_event(run, iteration, loss, timer))
            is_val = iteration % tc.val_interval == 0 or iteration == tc.iterations
            improved = False
            if is_val and not stop_now:
                last_val = validate(run, iteration, writers)
                improved = ckpt.improves(last_val[run.task.metric])
            pause = stop_after is not None and stop_after <= iteration < tc.iterations
            if stop_now or pause or is_val or iteration % tc.checkpoint_interval == 0:
                ckpt.save(iteration, best=improved)
            if stop_now:
                status = "interrupted"
                who = stop.name or "a signal on another rank"
                saved = ckpt.work_dir / LAST
                run.log(f"stopped by {who} at iteration {iteration}; saved {saved}. Continue with --resume.")
                break
            if pause:
                status = "paused"
                run.log(f"paused after iteration {iteration}; saved {ckpt.work_dir / LAST}")
                break
        if status == "finished" and info.distributed:
            emit(writers, replica_check(run, iteration))
    finally:
        stop.restore()
        for w in writers:
            w.close()
    return TrainResult(iteration, ckpt.best, last_val, ckpt.work_dir, status, stop.name)


# --------------------------------------------------------------------------------------------
# the named parts of the loop


def train_step(
    run: Run, batches: Iterator[Any], stop_requested: bool, iteration: int, timer: StepTimer
) -> tuple[float, bool]:
    """One optimizer step; returns (the loss averaged over processes, whether any process asked to stop)."""
    device = run.info.device
    timer.begin()
    inputs, targets = run.task.to_device(next(batches), device)
    if run.cfg.train.channels_last and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    timer.loaded()
    with torch.autocast(device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
        loss = run.task.loss(run.ddp_model(inputs), targets)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    # One small all-reduce per iteration makes every rank agree on the loss and on a stop request.
    flags = torch.stack([loss.detach().float(), torch.tensor(float(stop_requested), device=device)])
    if run.info.distributed:
        dist.all_reduce(flags)
    loss_value = flags[0].item() / run.info.world_size
    if not np.isfinite(loss_value):
        raise NonFiniteLossError(
            f"loss is {loss_value} at iteration {iteration}; stopped before the optimizer step. "
            f"{run.checkpointer.work_dir / LAST} (if any) holds the last good state. Lower train.lr, set "
            "train.grad_clip, or check the data."
        )
    if run.cfg.train.grad_clip:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.train.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    timer.stepped()
    return loss_value, flags[1].item() > 0


def validate(run: Run, iteration: int, writers: list[Writer]) -> dict[str, Any]:
    """The task's metrics on the validation split (all ranks take part); the model is left in train mode.

    In float32 whatever ``train.amp`` is, as ``tools/eval.py`` scores a checkpoint: the mIoU that picks
    ``best.pth`` is the one a later evaluation of that file reports.
    """
    metrics = run.task.evaluate(run.model, run.val_loader, run.info.device, None)
    if writers:
        event = run.task.val_event(iteration, metrics, run.model, run.info.device)
        event.record["train_seconds"] = run.checkpointer.train_seconds  # training time so far, for time-to-accuracy
        emit(writers, event)
    run.model.train()
    return metrics


def emit(writers: list[Writer], event: Event) -> None:
    for w in writers:
        w.write(event)


def train_event(run: Run, iteration: int, loss: float, timer: StepTimer) -> Event:
    lr = run.optimizer.param_groups[0]["lr"]
    mem, kind = peak_memory_gb(run.info.device)
    eta = timer.seconds_per_iteration() * (run.cfg.train.iterations - iteration)
    data, it = timer.data_time, timer.iter_time
    return Event(
        "train",
        iteration,
        record={"loss": loss, "lr": lr, "data_time": data, "iter_time": it, "train_seconds": timer.total,
                "peak_mem_gb": mem, "mem_kind": kind},
        scalars={"train/loss": loss, "train/lr": lr, "time/data": data, "time/iter": it},
        line=f"iter {iteration}/{run.cfg.train.iterations}  loss {loss:.4f}  lr {lr:.3e}  data {data:.3f}s  "
        f"iter {it:.3f}s  eta {format_seconds(eta)}  mem({kind}) {mem:.2f}G",
        postfix={"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "data": f"{data:.3f}s", "it": f"{it:.3f}s",
                 "mem": f"{mem:.2f}G"},
    )


def fingerprint(module: nn.Module) -> str:
    """A hash of every parameter and buffer: equal on all ranks exactly when their weights are equal."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def replica_check(run: Run, iteration: int) -> Event:
    """DDP keeps replicas equal; a mismatch would mean unsynchronised buffers (e.g. statistics)."""
    prints = all_gather_objects(fingerprint(run.model), run.info)
    same = "yes" if len(set(prints)) == 1 else "NO"
    line = f"weights identical on all {run.info.world_size} processes: {same}"
    return Event("final", iteration, record={"fingerprints": prints}, line=line)


class StepTimer:
    """Data and step times (exponential averages for display), an ETA that skips the warm-up steps, and
    ``total``: the seconds spent in training steps since the run began (carried over a resume)."""

    def __init__(self, total: float = 0.0) -> None:
        self.steps, self.total = 0, total
        self.data_time = self.iter_time = 0.0
        self.t0 = self.t_loaded = time.perf_counter()
        self.timed_since, self.timed_steps = self.t0, 0

    def begin(self) -> None:
        self.t0 = time.perf_counter()

    def loaded(self) -> None:
        self.t_loaded = time.perf_counter()

    def stepped(self) -> None:
        now = time.perf_counter()
        data, step = self.t_loaded - self.t0, now - self.t0
        self.total += step
        first = self.steps == 0
        self.data_time = data if first else 0.9 * self.data_time + 0.1 * data
        self.iter_time = step if first else 0.9 * self.iter_time + 0.1 * step
        self.steps += 1
        if self.steps == 2:  # the first two steps (allocation, worker start-up) are left out of the ETA
            self.timed_since, self.timed_steps = now, 0
        elif self.steps > 2:
            self.timed_steps += 1

    def seconds_per_iteration(self) -> float:
        if self.timed_steps == 0:
            return self.iter_time
        return (time.perf_counter() - self.timed_since) / self.timed_steps


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between iterations (then saves and exits)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

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


# --------------------------------------------------------------------------------------------
# building a run


def native_bf16(device: torch.device) -> bool:
    """Whether the CUDA ``device`` computes in bf16 natively (compute capability 8.0, Ampere, or later).

    Not ``torch.cuda.is_bf16_supported()``: by default it also counts the emulation older GPUs (V100, T4)
    offer, which is slow; those get fp16 with a gradient scaler instead.
    """
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device`` (None: full precision)."""
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("key 'train.amp' has value 'fp16', which needs CUDA; on CPU use bf16 or none")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def configure_backends(tc: TrainConfig, device: torch.device) -> None:
    """cuDNN picks the fastest convolution algorithms for the shapes it sees (``cudnn.benchmark``) unless
    ``train.deterministic`` asks for reproducible ones."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not tc.deterministic
        torch.backends.cudnn.deterministic = tc.deterministic


def data_worker_init(worker_id: int) -> None:
    """DataLoader workers: OpenCV single-threaded (each worker is one of many processes; OpenCV's own pool in
    every worker would oversubscribe the cores), then the per-worker seeding."""
    cv2.setNumThreads(0)
    worker_init_fn(worker_id)


def buffers_identical_by_construction(model: nn.Module) -> bool:
    """Whether every rank's buffers stay equal without DDP re-sending rank 0's before each forward.

    Under a process group the build syncs every layer's statistics (SyncBatchNorm, FastDeconv, IterNorm,
    ChannelDeconv, Delinear), so their running buffers are updated identically on all ranks. Plain BatchNorm
    remains only where SyncBatchNorm cannot run (CPU); its running statistics differ per rank, and then the
    broadcast keeps the replicas equal.
    """
    return not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
        for m in model.modules()
    )


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_loaders(cfg: Config, info: DistInfo, task: Task) -> tuple[DataLoader, ResumableSampler, DataLoader]:
    """The training loader (resumable, seeded per sample) and the validation loader (each sample once)."""
    train_set, val_set = task.build_datasets()
    tc, workers = cfg.train, cfg.data.num_workers
    sampler = ResumableSampler(len(train_set), info.world_size, info.rank, shuffle=True, seed=tc.seed)
    if sampler.per_rank < tc.batch_size:
        raise ConfigError(
            f"key 'train.batch_size' has value {tc.batch_size} per process x {info.world_size} processes, "
            f"more than the {len(train_set)} training images of {cfg.data.root}"
        )
    loader = DataLoader(
        SeededSamples(train_set), batch_size=tc.batch_size, sampler=sampler, num_workers=workers,
        pin_memory=info.device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
        worker_init_fn=data_worker_init, generator=make_generator(tc.seed, info.rank),
    )
    val_loader = build_eval_loader(
        val_set, batch_size=cfg.eval.batch_size, num_workers=min(workers, 2), worker_init_fn=data_worker_init,
        generator=make_generator(tc.seed, 1000 + info.rank),  # keeps the global torch RNG untouched
    )
    return loader, sampler, val_loader


def build_run(cfg: Config, info: DistInfo, work_dir: Path) -> Run:
    """Task, data, model (DDP-wrapped under a process group), optimizer, schedule, scaler, checkpointer."""
    log = tqdm.write if info.is_main else (lambda *_a, **_k: None)
    cfg.work_dir = str(work_dir)
    task = build_task(cfg)
    seed_all(cfg.train.seed)  # the same seed on every rank: identical initial weights
    configure_backends(cfg.train, info.device)
    loader, sampler, val_loader = build_loaders(cfg, info, task)
    model = task.build_model().to(info.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # From here on each rank draws its own stream (e.g. dropout masks differ across ranks, as they should).
    torch.manual_seed(derive_seed(cfg.train.seed, 1, info.rank))
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    amp_dtype = resolve_amp(cfg.train.amp, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp_dtype == torch.float16)
    ddp_model: nn.Module = model
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        ddp_model = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False,
                                            broadcast_buffers=not buffers_identical_by_construction(model))
    if cfg.train.compile != "none":
        # Only the training step's forward; validation and checkpoints use the plain model.
        ddp_model = torch.compile(ddp_model, mode=cfg.train.compile)
    checkpointer = Checkpointer(
        work_dir, info, to_dict(cfg), model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, log=log
    )
    return Run(cfg, info, task, model, ddp_model, optimizer, scheduler, scaler, amp_dtype, loader, sampler,
               val_loader, checkpointer, log)


def announce(run: Run, work_dir: Path) -> None:
    """Rank 0 writes the resolved config into the run folder and says what will run."""
    if not run.info.is_main:
        return
    cfg, info = run.cfg, run.info
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "config.yaml").write_text(dump_yaml(cfg))
    run.log(f"run folder: {work_dir}")
    n_train = len(run.loader.dataset)  # type: ignore[arg-type]
    run.log(
        f"batch: {cfg.train.batch_size} per process x {info.world_size} processes = "
        f"{cfg.train.batch_size * info.world_size} effective; {run.iters_per_epoch} iterations per epoch of "
        f"{n_train} images; {cfg.train.iterations} iterations; amp: {run.amp_dtype or 'off'}; device: {info.device}"
    )


def epoch_batches(run: Run, iteration: int) -> Iterator[Any]:
    """Batches from ``iteration`` on, forever: the position within an epoch follows from the iteration."""
    epoch, done = divmod(iteration, run.iters_per_epoch)
    while True:
        run.sampler.set_epoch(epoch, start=done * run.cfg.train.batch_size)
        yield from run.loader
        epoch, done = epoch + 1, 0
