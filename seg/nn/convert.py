"""Put deconvolution into an existing model (``deconvolve``) and fold it out again (``fold_deconv``);
replace its BatchNorms by another norm, or by none (``replace_batchnorm``)."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from seg.nn.deconv import FastDeconv, SampleNormConv2d

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
    norm_type: str = "none",
    exclude: Iterable[str] = (),
) -> nn.Module:
    """Replace every ``nn.Conv2d`` by a ``FastDeconv`` and every BatchNorm by ``nn.Identity``.

    Weights (and biases; a zero bias where there was none) carry over. The keyword settings have the
    names and defaults of the ``model.deconv`` config section, so a config's values can be passed as
    ``**settings``. The layer taking the 3-channel image (the stem) gets ``stem_n_iter`` and the
    periodic freeze and always computes the reference operator; the others get ``n_iter``,
    ``stats_every`` and ``matrix_grad``. ``norm_type`` (ND++'s per-sample input normalisation) applies to
    every converted layer, the stem included. Modules whose qualified name matches a pattern in ``exclude``
    are left alone. Returns the converted module (a new object when ``module`` itself is a conv); its
    ``deconv_report`` attribute says what changed, and the summary is logged.
    """
    exclude = tuple(exclude)
    body = dict(block=block, sampling_stride=sampling_stride, eps=eps, momentum=momentum, sync=sync,
                n_iter=n_iter, freeze=False, freeze_iter=stem_freeze_iter, stats_every=stats_every,
                matrix_grad=matrix_grad, norm_type=norm_type)
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
    """Replace each ``FastDeconv`` by a plain ``nn.Conv2d`` with its eval-mode (folded) weight and bias.

    A layer with ND++'s ``norm_type`` becomes a ``SampleNormConv2d``: its per-sample input normalisation
    cannot be folded into the weight, so the folded conv keeps it.
    """

    def fold(layer: FastDeconv) -> nn.Conv2d:
        weight, bias = layer.folded()
        extra = {} if layer.norm_type == "none" else dict(norm_type=layer.norm_type, eps=layer.eps)
        cls = nn.Conv2d if layer.norm_type == "none" else SampleNormConv2d
        conv = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                   layer.dilation, layer.groups, bias=True, device=weight.device, dtype=weight.dtype, **extra)
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


@dataclass
class NormReport:
    """What ``replace_batchnorm`` changed, by qualified module name."""

    replaced: list[str] = field(default_factory=list)
    conv_biases: list[str] = field(default_factory=list)
    new_type: str = "Identity"

    def summary(self) -> str:
        text = f"replace_batchnorm: {len(self.replaced)} BatchNorms -> {self.new_type}"
        if self.conv_biases:
            text += f", {len(self.conv_biases)} convs given a bias"
        return text


def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    # The new layer lives where the old one did (device, dtype) and keeps its train/eval mode.
    ref = next((t for t in [*old.parameters(), *old.buffers()] if t.is_floating_point()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    return new.train(old.training)


def replace_batchnorm(
    module: nn.Module, make: Callable[[int], nn.Module] | None, *, conv_bias: bool = False
) -> nn.Module:
    """Replace every BatchNorm (any ``_BatchNorm``, SyncBatchNorm included) by ``make(num_features)``.

    ``make=None`` removes the norms (``nn.Identity``). An activation (and drop) that timm's
    ``BatchNormAct2d`` carries inside the norm is kept after the new layer. ``conv_bias`` gives every
    ``nn.Conv2d`` without a bias a zero one (a model without norms needs them). Convs are otherwise left
    alone. Returns the module (a new object when ``module`` itself is a BatchNorm); its ``norm_report``
    attribute says what changed, and the summary is logged.
    """
    report = NormReport()

    def convert(name: str, norm: _BatchNorm) -> nn.Module:
        report.replaced.append(name)
        tail = _norm_replacement(norm)
        if make is None:
            return tail
        new = _like(make(norm.num_features), norm)
        report.new_type = type(new).__name__
        return new if isinstance(tail, nn.Identity) else nn.Sequential(new, *tail)

    def walk(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm):
                setattr(parent, child_name, convert(prefix + child_name, child))
            else:
                walk(child, f"{prefix}{child_name}.")

    if isinstance(module, _BatchNorm):
        module = convert("", module)
    else:
        walk(module, "")
    if conv_bias:
        for name, conv in module.named_modules():
            if isinstance(conv, nn.Conv2d) and conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device,
                                                     dtype=conv.weight.dtype))
                report.conv_biases.append(name)
    module.norm_report = report  # type: ignore[attr-defined]
    logger.info(report.summary())
    return module
