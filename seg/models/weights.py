"""Loading local weight files into a built model: whole-model weights, encoder weights, checkpoints.

Nothing is downloaded. Every key must match: missing, unexpected and wrongly shaped keys are errors
that name the file and the keys (the only keys ignored are an ImageNet classifier's, e.g. ``fc.*``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

# Classification layers of ImageNet encoders (torchvision/smp, timm, pretrainedmodels); a segmentation
# encoder has none of them, so they are dropped from encoder weight files.
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.")
_SHOW = 8  # keys listed per kind in an error message


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file: a state_dict, or a checkpoint with one under ``model``/``state_dict``.

    A ``module.`` prefix (DistributedDataParallel) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean "not a weights file we can read"
        raise ValueError(f"model.pretrained: cannot read {path} as a PyTorch weights file: {e}") from e
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"model.pretrained: {path} holds no state_dict (expected a mapping of names to tensors, "
            f"or a checkpoint with one under 'model' or 'state_dict')"
        )
    return {_strip(k, "module."): v for k, v in obj.items()}


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def _list(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOW])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > _SHOW else shown


def check_keys(target: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ``ValueError`` naming every missing, unexpected or wrongly shaped key of ``state``."""
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
    raise ValueError("\n".join(lines))


def load_pretrained(model: nn.Module, path: str | Path) -> str:
    """Load whole-model or encoder weights from ``path`` into a built model; returns 'model' or 'encoder'.

    Whole-model files (a checkpoint or a state_dict with ``encoder.*`` and ``head.*`` keys) must match the
    model exactly. Anything else is taken as encoder weights: an optional ``encoder.`` prefix is removed,
    an ImageNet classifier (``fc.*``, ``head.*``, ...) is dropped, and the rest must match the encoder.
    """
    state = read_state_dict(path)
    if any(k.startswith("encoder.") for k in state) and any(k.startswith("head.") for k in state):
        check_keys(model, state, f"model.pretrained: whole-model weights {path}")
        model.load_state_dict(state)
        return "model"

    encoder = model.encoder
    state = {_strip(k, "encoder."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    expected = encoder.state_dict().keys()
    # timm encoders inside smp keep the timm model under ``model.``; a plain timm file lacks that prefix.
    if not state.keys() & expected and {"model." + k for k in state} & expected:
        state = {"model." + k: v for k, v in state.items()}
    check_keys(encoder, state, f"model.pretrained: encoder weights {path}")
    encoder.load_state_dict(state)
    return "encoder"


def model_from_checkpoint(checkpoint: Mapping[str, Any] | str | Path) -> nn.Module:
    """Rebuild the model recorded in a training checkpoint and load its weights (``model.pretrained`` is
    not read again: the checkpoint already holds the trained weights)."""
    from seg.config import from_dict
    from seg.models.build import build_model

    source = "checkpoint"
    if not isinstance(checkpoint, Mapping):
        source = str(checkpoint)
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for key in ("model", "config"):
        if key not in checkpoint:
            raise ValueError(f"{source}: not a training checkpoint, key '{key}' is missing")
    cfg = from_dict(checkpoint["config"], source)
    model = build_model(cfg.model, load_pretrained=False)
    state = {_strip(k, "module."): v for k, v in checkpoint["model"].items()}
    check_keys(model, state, source)
    model.load_state_dict(state)
    return model
