"""The training loop's parts: distributed set-up, sampling, optimizer/schedule, checkpoints, logging."""

from seg.engine.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from seg.engine.distributed import DistInfo, elastic_restart_count, finish, init_distributed
from seg.engine.optim import PolyWarmup, build_optimizer, build_scheduler
from seg.engine.sampling import ResumableSampler, SeededSamples
from seg.engine.trainer import DataRootError, NonFiniteLossError, TrainResult, train

__all__ = [
    "BEST",
    "LAST",
    "CheckpointError",
    "DataRootError",
    "DistInfo",
    "NonFiniteLossError",
    "PolyWarmup",
    "ResumableSampler",
    "SeededSamples",
    "TrainResult",
    "build_optimizer",
    "build_scheduler",
    "elastic_restart_count",
    "finish",
    "init_distributed",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]
