"""The training engine: one loop for every task over named parts (step, validate, checkpointer, writers),
distributed set-up, resumable sampling and the optimizer/schedule."""

from seg.checkpoint import BEST, LAST, CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from seg.engine.checkpointer import Checkpointer, NonFiniteLossError
from seg.engine.distributed import DistInfo, elastic_restart_count, finish, init_distributed
from seg.engine.optim import PolyWarmup, build_optimizer, build_scheduler
from seg.engine.sampling import ResumableSampler, SeededSamples
from seg.engine.trainer import TrainResult, train

__all__ = [
    "BEST",
    "LAST",
    "CheckpointError",
    "Checkpointer",
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
