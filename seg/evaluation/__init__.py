"""Evaluation: segmentation metrics (confusion matrix) and ``evaluate``, the official Cityscapes bridge, the eval loader
and batch helpers every task shares; classification's top-k accuracy is in :mod:`seg.evaluation.topk`."""

from seg.evaluation.evaluator import ShardedEvalSampler, build_eval_loader, evaluate
from seg.evaluation.metrics import ConfusionMatrix, format_table

__all__ = ["ConfusionMatrix", "ShardedEvalSampler", "build_eval_loader", "evaluate", "format_table"]
