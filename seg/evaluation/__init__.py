"""Segmentation metrics (confusion matrix), the shared ``evaluate`` loop, the official Cityscapes bridge."""

from seg.evaluation.evaluator import ShardedEvalSampler, build_eval_loader, evaluate
from seg.evaluation.metrics import ConfusionMatrix, format_table

__all__ = ["ConfusionMatrix", "ShardedEvalSampler", "build_eval_loader", "evaluate", "format_table"]
