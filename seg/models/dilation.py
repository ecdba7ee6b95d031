"""Dilated ResNets with torchvision's geometry (``replace_stride_with_dilation``), not smp's.

To turn a stride-2 stage into a dilated one exactly (the "à trous" algorithm), the stride is removed and
every convolution *after* the removed stride is dilated by 2, so that on the positions the strided
network computed, the dilated one computes the same values. The convolution that carried the stride
still reads the input grid of the stage, so it keeps the previous dilation. torchvision
(``replace_stride_with_dilation``, used by the paper's code), timm (``output_stride``) and mmsegmentation
(``contract_dilation``) all do this. smp's ``make_dilated`` instead gives every convolution of the stage
the new dilation, including the one that carried the stride (and 1x1 convolutions, where it does
nothing), so its dilated ResNets read a wider, different neighbourhood in the first block of each
dilated stage.

:func:`contract_dilation` rewrites an smp encoder that smp has already dilated to torchvision's geometry.
Only ``dilation`` and ``padding`` change; strides, weights and module names stay as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck


def _stride_carriers() -> dict[type, tuple[str, ...]]:
    """Block type -> the convs of a stage's first block that carry the stage's stride.

    torchvision's blocks (smp's ``resnet*`` and ``resnext*``) put the stride on the first 3x3; smp's
    SENet blocks (``se_resnet*`` put it on the first 1x1, the Caffe layout; ``se_resnext*`` and
    ``senet154`` on the 3x3). The shortcut's conv carries it too (a 3x3 in ``senet154``).
    """
    table: dict[type, tuple[str, ...]] = {
        Bottleneck: ("conv2", "downsample.0"),
        BasicBlock: ("conv1", "downsample.0"),
    }
    try:  # a private smp module: without it, SENet encoders keep smp's geometry
        from segmentation_models_pytorch.encoders import _senet
    except ImportError:
        return table
    table[_senet.SEBottleneck] = ("conv2", "downsample.0")
    table[_senet.SEResNeXtBottleneck] = ("conv2", "downsample.0")
    table[_senet.SEResNetBottleneck] = ("conv1", "downsample.0")
    return table


def _set_dilation(conv: nn.Conv2d, dilation: int) -> bool:
    """Give ``conv`` ``dilation`` with "same" padding; a 1x1 conv gets dilation 1 (it has no taps to
    spread). Returns whether anything changed."""
    kh, kw = conv.kernel_size
    d = dilation if (kh, kw) != (1, 1) else 1
    geometry = ((d, d), (d * (kh // 2), d * (kw // 2)))
    if (conv.dilation, conv.padding) == geometry:
        return False
    conv.dilation, conv.padding = geometry
    return True


def contract_dilation(encoder: nn.Module, output_stride: int) -> list[str]:
    """Rewrite the dilated stages of an smp ResNet-family encoder to torchvision's geometry, in place.

    In each stage that smp dilated (nominal stride above ``output_stride``): the convs of the first
    block that carried the stride get the dilation of the stage before; every other kxk conv gets the
    stage's dilation (``stage stride // output_stride``); 1x1 convs get dilation 1. Paddings follow
    (``dilation * (k // 2)``).

    Encoders of other families (timm's ``tu-`` encoders already have this geometry), and output
    stride 32, are left alone.

    Args:
        encoder: an smp encoder built with ``output_stride`` (``get_stages()`` gives its stages).
        output_stride: the stride it was built with (8 or 16 dilate; 32 does nothing).

    Returns:
        The qualified names (within ``encoder``) of the convs whose dilation or padding changed.
    """
    get_stages = getattr(encoder, "get_stages", None)
    if output_stride >= 32 or get_stages is None:
        return []
    try:
        stages: Mapping[int, Sequence[nn.Module]] = get_stages()
    except NotImplementedError:
        return []
    carriers = _stride_carriers()
    names = {m: n for n, m in encoder.named_modules()}
    changed: list[str] = []
    for stage_stride, modules in stages.items():
        if stage_stride <= output_stride:
            continue
        dilation = stage_stride // output_stride
        # Each stage halves the resolution, so the stage before ran at half this dilation (at least 1).
        previous = max(dilation // 2, 1)
        for stage in modules:
            blocks = list(stage.children())
            if not blocks or type(blocks[0]) not in carriers:
                continue  # not a block layout we know: keep smp's geometry rather than guess
            first = {f"{names[blocks[0]]}.{c}" for c in carriers[type(blocks[0])]}
            for module in stage.modules():
                if not isinstance(module, nn.Conv2d):
                    continue
                name = names[module]
                if module.stride != (1, 1):
                    # smp's patch removes every stride of a dilated stage; anything else means another
                    # smp version changed the patch, and the padding set here would be wrong.
                    raise RuntimeError(
                        f"contract_dilation: {name} still has stride {module.stride} at output stride "
                        f"{output_stride}; expected smp to have replaced it by dilation"
                    )
                if _set_dilation(module, previous if name in first else dilation):
                    changed.append(name)
    return changed
