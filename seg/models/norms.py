"""``model.norm`` applied to a model built with the libraries' BatchNorm, for every task alike.

:data:`NORM_APPLIERS` maps each ``model.norm`` to the function that turns such a model into that norm's model;
:func:`sync_statistics` is the one place that decides whether normalisation statistics span all processes.
Both the segmentation builder (:mod:`seg.models.build`) and the classifiers (:mod:`seg.models.classifiers`)
use them; the choices are described in :mod:`seg.models.build`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch.nn as nn
from timm.layers import convert_sync_batchnorm

from seg.config import ConfigError, DeconvConfig, IterNormConfig, ModelConfig
from seg.distributed import group_on_cuda, world_size
from seg.nn import ChannelDeconv, IterNorm, deconvolve
from seg.nn.convert import replace_batchnorm

logger = logging.getLogger(__name__)

# Fields of ``model.deconv`` that the builder itself acts on; every other field is a ``deconvolve``
# keyword of the same name and is passed on as it is, so a new setting is not listed again here.
BUILDER_DECONV_FIELDS = frozenset({"classifier", "keep_bn"})


def _classifier_names(model: nn.Module) -> list[str]:
    return [
        n for n, m in model.named_modules() if n.split(".")[-1] == "classifier" and isinstance(m, nn.Conv2d)
    ]


def _keywords(section: Any, target: Callable, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A config section's fields (less ``skip``) as keywords of ``target``, which must accept them all."""
    settings = {k: v for k, v in dataclasses.asdict(section).items() if k not in skip}
    unknown = sorted(settings.keys() - inspect.signature(target).parameters.keys())
    if unknown:  # a config field nobody wired up: a bug, not a user error
        raise TypeError(f"{section._key} fields {unknown}: not {target.__name__}() keywords "
                        f"nor handled by the builder")
    return settings


def deconv_settings(d: DeconvConfig, *, sync: bool) -> dict[str, Any]:
    """The ``deconvolve`` keywords of a ``model.deconv`` section, with the build's ``sync`` decision."""
    return dict(_keywords(d, deconvolve, BUILDER_DECONV_FIELDS), sync=sync)


def iternorm_settings(c: IterNormConfig, *, sync: bool) -> dict[str, Any]:
    """The ``IterNorm`` keywords of a ``model.iternorm`` section, with the build's ``sync`` decision."""
    return dict(_keywords(c, IterNorm), sync=sync)


def gn_groups(channels: int, groups: int) -> int:
    """``groups`` if it divides ``channels``, else the largest number of groups below it that does."""
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


def sync_statistics(cfg: ModelConfig) -> bool:
    """Whether normalisation statistics span all processes; the one place this is decided.

    With several processes, always (the global batch, as SyncBatchNorm does): BatchNorm, FastDeconv,
    IterNorm, ChannelDeconv and Delinear act on it; GroupNorm and ``none`` have no batch statistics. In one
    process, only when ``model.deconv.sync`` asks for it (then the layers sync once a process group exists).
    """
    return world_size() > 1 or (cfg.norm == "deconv" and cfg.deconv.sync)


def _apply_deconv(model: nn.Module, cfg: ModelConfig, sync: bool) -> nn.Module:
    d = cfg.deconv
    settings = deconv_settings(d, sync=sync)
    classifiers = _classifier_names(model)
    kept = _kept_batchnorms(model, d.keep_bn, cfg.arch)
    model = deconvolve(model, exclude=classifiers + kept, **settings)
    if d.classifier:
        # The reference heads whiten all of the classifier's input channels together (block = C_in).
        for name in classifiers:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            conv = getattr(parent, attr)
            setattr(parent, attr, deconvolve(conv, **dict(settings, block=conv.in_channels)))
    # The BatchNorms kept normalise like those of a bn model, over all processes when the statistics sync.
    return _apply_bn(model, cfg, sync) if kept else model


def _kept_batchnorms(model: nn.Module, patterns: list[str], arch: str) -> list[str]:
    """Names of the BatchNorm layers that ``model.deconv.keep_bn`` keeps; a pattern matching none is an error."""
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    kept = []
    for pattern in patterns:
        found = [n for n in norms if fnmatch.fnmatchcase(n, pattern)]
        if not found:
            raise ConfigError(f"key 'model.deconv.keep_bn' has pattern {pattern!r}, which matches no BatchNorm "
                              f"layer of {arch}; its BatchNorm layers are named like {norms[:3]}")
        kept += [n for n in found if n not in kept]
    return kept


def _apply_bn(model: nn.Module, cfg: ModelConfig, sync: bool) -> nn.Module:
    if sync:
        if group_on_cuda():
            # timm's converter also handles its BatchNormAct2d (torch's would drop the activation).
            model = convert_sync_batchnorm(model)
        else:
            warnings.warn(
                "model.norm=bn with several processes on CPU: SyncBatchNorm does not run on CPU, so each "
                "process normalises with its own batch statistics",
                stacklevel=3,
            )
    return model


def _apply_gn(model: nn.Module, cfg: ModelConfig, sync: bool) -> nn.Module:
    fewer: dict[int, int] = {}  # channels -> groups, where model.gn_groups does not divide them

    def make(channels: int) -> nn.GroupNorm:
        groups = gn_groups(channels, cfg.gn_groups)
        if groups != cfg.gn_groups:
            fewer[channels] = groups
        return nn.GroupNorm(groups, channels)

    model = replace_batchnorm(model, make)
    if fewer:
        logger.info("model.gn_groups=%d does not divide every layer: channels -> groups %s", cfg.gn_groups, fewer)
    return model


def _apply_iternorm(model: nn.Module, cfg: ModelConfig, sync: bool) -> nn.Module:
    settings = iternorm_settings(cfg.iternorm, sync=sync)
    return replace_batchnorm(model, lambda channels: IterNorm(channels, **settings))


def _apply_channel_deconv(model: nn.Module, cfg: ModelConfig, sync: bool) -> nn.Module:
    settings = dict(_keywords(cfg.channel_deconv, ChannelDeconv), sync=sync)
    # Fewer channels than the block: whiten them all together (the reference's heads use block = C).
    return replace_batchnorm(model, lambda c: ChannelDeconv(**dict(settings, block=min(settings["block"], c))))


def _apply_none(model: nn.Module, cfg: ModelConfig, sync: bool) -> nn.Module:
    # Without a norm after it, a conv needs its own bias (the norm's shift did that job).
    return replace_batchnorm(model, None, conv_bias=True)


# model.norm -> what turns the model built with the libraries' BatchNorm into that norm's model.
NORM_APPLIERS: dict[str, Callable[[nn.Module, ModelConfig, bool], nn.Module]] = {
    "bn": _apply_bn,
    "deconv": _apply_deconv,
    "gn": _apply_gn,
    "iternorm": _apply_iternorm,
    "channel_deconv": _apply_channel_deconv,
    "none": _apply_none,
}
