"""Put deconvolution into an existing model (``deconvolve``) and fold it out again (``fold_deconv``)."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from seg.nn.deconv import FastDeconv

logger = logging.getLogger(__name__)

# The layer that sees the image gets the stem settings; it is recognised by its input channels.
IMAGE_CHANNELS = 3


@dataclass
class DeconvReport:
    """What ``deconvolve`` changed, by qualified module name."""

    converted: list[str] = field(default_factory=list)
    stems: list[str] = field(default_factory=list)
    norms_removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"deconvolve: {len(self.converted)} convs -> FastDeconv ({len(self.stems)} with stem settings), "
                f"{len(self.norms_removed)} BatchNorms removed")
        if self.skipped:
            text += f", left alone: {', '.join(self.skipped)}"
        return text


def _excluded(name: str, patterns: Iterable[str]) -> bool:
    # A pattern matches a module and everything inside it; shell-style wildcards are allowed.
    return any(fnmatch.fnmatchcase(name, p) or name.startswith(p.rstrip(".") + ".") for p in patterns if p)


def _plain_conv(module: nn.Module) -> bool:
    # Subclasses that override forward (e.g. dynamic "same" padding) would change meaning if replaced.
    return (isinstance(module, nn.Conv2d) and not isinstance(module, FastDeconv)
            and type(module).forward is nn.Conv2d.forward and module.padding_mode == "zeros")


def _to_fast_deconv(conv: nn.Conv2d, **settings) -> FastDeconv:
    layer = FastDeconv(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, bias=True, **settings)
    layer = layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(conv.weight)
        if conv.bias is not None:
            layer.bias.copy_(conv.bias)
        else:
            layer.bias.zero_()
    layer.weight.requires_grad_(conv.weight.requires_grad)
    return layer


def _norm_replacement(norm: _BatchNorm) -> nn.Module:
    # timm's BatchNormAct2d carries the activation (and drop) inside the norm: keep those.
    act = getattr(norm, "act", None)
    if isinstance(act, nn.Module):
        drop = getattr(norm, "drop", None)
        parts = [m for m in (drop, act) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
        return nn.Sequential(*parts) if parts else nn.Identity()
    return nn.Identity()


def deconvolve(
    module: nn.Module,
    *,
    block: int = 64,
    sampling_stride: int = 3,
    n_iter: int = 5,
    eps: float = 1e-5,
    momentum: float = 0.1,
    stem_n_iter: int = 15,
    stem_freeze: bool = True,
    stem_freeze_iter: int = 100,
    sync: bool = False,
    stats_every: int = 1,
    matrix_grad: bool = True,
    exclude: Iterable[str] = (),
) -> nn.Module:
    """Replace every ``nn.Conv2d`` by a ``FastDeconv`` and every BatchNorm by ``nn.Identity``.

    Weights (and biases; a zero bias where there was none) carry over. The keyword settings have the
    names and defaults of the ``model.deconv`` config section, so a config's values can be passed as
    ``**settings``. The layer taking the 3-channel image (the stem) gets ``stem_n_iter`` and the
    periodic freeze and always computes the reference operator; the others get ``n_iter``,
    ``stats_every`` and ``matrix_grad``. Modules whose qualified name matches a pattern in ``exclude``
    are left alone. Returns the converted module (a new object when ``module`` itself is a conv); its
    ``deconv_report`` attribute says what changed, and the summary is logged.
    """
    exclude = tuple(exclude)
    body = dict(block=block, sampling_stride=sampling_stride, eps=eps, momentum=momentum, sync=sync,
                n_iter=n_iter, freeze=False, freeze_iter=stem_freeze_iter, stats_every=stats_every,
                matrix_grad=matrix_grad)
    # The stem's input covariance is ill-conditioned (more iterations); its statistics are refreshed only
    # periodically, as in the reference, and the speed options never apply to it.
    stem = dict(body, n_iter=stem_n_iter, freeze=stem_freeze, stats_every=1, matrix_grad=True)
    report = DeconvReport()

    def convert(name: str, child: nn.Module) -> nn.Module | None:
        if _excluded(name, exclude):
            return None
        if _plain_conv(child):
            is_stem = child.in_channels == IMAGE_CHANNELS
            report.converted.append(name)
            if is_stem:
                report.stems.append(name)
            return _to_fast_deconv(child, **(stem if is_stem else body))
        if isinstance(child, _BatchNorm):
            report.norms_removed.append(name)
            return _norm_replacement(child)
        if isinstance(child, nn.Conv2d) and not isinstance(child, FastDeconv):
            report.skipped.append(f"{name} ({type(child).__name__})")
        return None

    def walk(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}{child_name}"
            new = convert(name, child)
            if new is not None:
                setattr(parent, child_name, new)
            elif not _excluded(name, exclude):
                walk(child, name + ".")

    root = convert("", module) if not isinstance(module, (FastDeconv,)) else None
    if root is not None:
        module = root
    else:
        walk(module, "")
    module.deconv_report = report  # type: ignore[attr-defined]
    logger.info(report.summary())
    return module


def fold_deconv(module: nn.Module) -> nn.Module:
    """Replace each ``FastDeconv`` by a plain ``nn.Conv2d`` with its eval-mode (folded) weight and bias."""

    def fold(layer: FastDeconv) -> nn.Conv2d:
        weight, bias = layer.folded()
        conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, bias=True, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        return conv.train(layer.training)

    if isinstance(module, FastDeconv):
        return fold(module)
    for name, child in list(module.named_children()):
        if isinstance(child, FastDeconv):
            setattr(module, name, fold(child))
        else:
            fold_deconv(child)
    return module
