"""The training engine: one loop for every task over named parts (step, validate, checkpointer, writers),
distributed set-up, resumable sampling and the optimizer/schedule."""

from seg.engine.checkpointer import NonFiniteLossError
from seg.engine.distributed import DistInfo, elastic_restart_count, finish, init_distributed
from seg.engine.trainer import train

__all__ = ["DistInfo", "NonFiniteLossError", "elastic_restart_count", "finish", "init_distributed", "train"]
