"""Loading local weight files into a built model: whole-model weights or encoder weights.

Nothing is downloaded; files are read by :func:`seg.checkpoint.read_weights`. Every key must match:
missing, unexpected and wrongly shaped keys are a :class:`~seg.checkpoint.CheckpointError` that names the
file and the keys (the only keys ignored are an ImageNet classifier's, e.g. ``fc.*``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn as nn

from seg.checkpoint import CheckpointError, read_weights

# Classification layers of ImageNet encoders (torchvision/smp, timm, pretrainedmodels); a segmentation
# encoder has none of them, so they are dropped from encoder weight files.
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.")
_SHOW = 8  # keys listed per kind in an error message


def _list(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOW])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > _SHOW else shown


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
    # The usual cause: weights of one norm loaded into the other (BatchNorm has running_var,
    # FastDeconv has running_deconv).
    file_bn = any(k.endswith("running_var") for k in unexpected)
    file_deconv = any(k.endswith("running_deconv") for k in unexpected)
    if file_bn and any(k.endswith("running_deconv") for k in missing):
        lines.append("  the file holds BatchNorm weights, the model uses deconvolution (model.norm: deconv)")
    if file_deconv and any(k.endswith("running_var") for k in missing):
        lines.append("  the file holds deconvolution weights, the model uses BatchNorm (model.norm: bn)")
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
