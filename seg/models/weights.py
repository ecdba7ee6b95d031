"""Loading local weight files into a built model: whole-model weights or encoder weights.

Nothing is downloaded; files are read by :func:`seg.checkpoint.read_weights`. Every key must match:
missing, unexpected and wrongly shaped keys are a :class:`~seg.checkpoint.CheckpointError` that names the
file and the keys (the only keys ignored are an ImageNet classifier's, e.g. ``fc.*``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from seg.checkpoint import CheckpointError, read_weights
from seg.nn import ChannelDeconv, FastDeconv, IterNorm

# Classification layers of ImageNet encoders (torchvision/smp, timm, pretrainedmodels); a segmentation
# encoder has none of them, so they are dropped from encoder weight files.
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.")
_SHOW = 8  # keys listed per kind in an error message

# How error messages name each model.norm.
NORM_NAMES = {"bn": "BatchNorm", "deconv": "deconvolution", "gn": "GroupNorm", "iternorm": "IterNorm",
              "channel_deconv": "ChannelDeconv", "none": "no normalisation"}
# The buffer that tells a module's norm in a weights file, checked in this order per module (ChannelDeconv
# also has running_deconv and running_var, FastDeconv and IterNorm also running_mean).
_FILE_MARKERS = (("running_mean1", "channel_deconv"), ("running_wm", "iternorm"), ("running_deconv", "deconv"),
                 ("running_var", "bn"))
# A model's norm from its layers; FastDeconv first (a deconvolution model may hold a ChannelDeconv too).
_MODEL_LAYERS = ((FastDeconv, "deconv"), (IterNorm, "iternorm"), (ChannelDeconv, "channel_deconv"),
                 (_BatchNorm, "bn"), (nn.GroupNorm, "gn"))


def _list(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOW])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > _SHOW else shown


def _file_norm(keys: Iterable[str]) -> str | None:
    """The model.norm a state_dict was saved with, from its buffers (None: no batch statistics in it)."""
    leaves: dict[str, set[str]] = defaultdict(set)
    for key in keys:
        prefix, _, leaf = key.rpartition(".")
        leaves[prefix].add(leaf)
    found = {next((norm for marker, norm in _FILE_MARKERS if marker in names), None) for names in leaves.values()}
    return next((norm for _, norm in _MODEL_LAYERS if norm in found), None)


def _model_norm(model: nn.Module) -> str:
    for cls, norm in _MODEL_LAYERS:
        if any(isinstance(m, cls) for m in model.modules()):
            return norm
    return "none"


def check_keys(target: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected or wrongly shaped key of ``state``.

    ``source`` starts the message and should name the file (or say where the weights came from).
    """
    expected = target.state_dict()
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    shapes = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{source} does not match the model:"]
    if missing:
        lines.append(f"  missing keys: {_list(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {_list(unexpected)}")
    if shapes:
        more = " ..." if len(shapes) > _SHOW else ""
        lines.append(f"  shape mismatches: {', '.join(shapes[:_SHOW])}{more}")
    # The usual cause: weights of one norm loaded into a model of another (each has its own buffers).
    file_norm, model_norm = _file_norm(state.keys()), _model_norm(target)
    if file_norm is not None and file_norm != model_norm:
        lines.append(f"  the file holds {NORM_NAMES[file_norm]} weights, the model uses {NORM_NAMES[model_norm]} "
                     f"(model.norm: {model_norm})")
    raise CheckpointError("\n".join(lines))


def load_pretrained(model: nn.Module, path: str | Path) -> str:
    """Load whole-model or encoder weights from ``path`` into a built model; returns 'model' or 'encoder'.

    Whole-model files (a checkpoint or a state_dict with ``encoder.*`` and ``head.*`` keys) must match the
    model exactly. Anything else is taken as encoder weights: an optional ``encoder.`` prefix is removed,
    an ImageNet classifier (``fc.*``, ``head.*``, ...) is dropped, and the rest must match the encoder.

    Raises:
        CheckpointError: the file is missing, unreadable, holds no state_dict, or does not match.
    """
    state = read_weights(path, "model.pretrained weights file")
    if any(k.startswith("encoder.") for k in state) and any(k.startswith("head.") for k in state):
        check_keys(model, state, f"model.pretrained: whole-model weights {path}")
        model.load_state_dict(state)
        return "model"

    encoder = model.encoder
    state = {k.removeprefix("encoder."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    expected = encoder.state_dict().keys()
    # timm encoders inside smp keep the timm model under ``model.``; a plain timm file lacks that prefix.
    if not state.keys() & expected and {"model." + k for k in state} & expected:
        state = {"model." + k: v for k, v in state.items()}
    check_keys(encoder, state, f"model.pretrained: encoder weights {path}")
    encoder.load_state_dict(state)
    return "encoder"
