"""The CIFAR classifiers of the network deconvolution paper (Ye et al., ICLR 2020), layer for layer.

VGG-11/13/16/19 and ResNet-18/34/50 (here), and the rest of the paper's Table 1 (:mod:`seg.models.cifar_zoo`:
PreAct-ResNet-18, DenseNet-121, ResNeXt-29 32x4d, MobileNetV2, DPN-92, PNASNet-A/B, SENet-18, EfficientNet-B0),
as the reference builds them (github.com/yechengxi/deconvolution,
``models/vgg.py``, ``models/resnet.py``, assembled by ``main.py``): CIFAR stems (3x3 conv at stride 1, no
max-pool), 32x32 inputs, and either Conv + BatchNorm (``norm="bn"``) or every conv a ``FastDeconv`` with no
BatchNorm (``norm="deconv"``).

Names follow torchvision where the reference differs only in naming, so that classification weights and
segmentation encoders share keys: ResNet ``conv1/bn1/layer1..4/fc`` with ``downsample`` shortcuts (the
reference: ``shortcut`` and ``linear``), VGG ``features`` (same indices as torchvision's ``vgg*_bn``) and
``classifier``. The classifier is always the last child (``fc`` / ``classifier``), so an encoder is the
model without it. The reference's optional ``ChannelDeconv`` before the classifier is ``channel_deconv`` in
both families (the reference's ResNet calls it ``deconv1``); it is an ``nn.Identity`` when unused.

Classifier rules (reference ``main.py``, whose ``--delinear`` defaults to True), for either norm:

* ``block_fc == 0``: a plain ``nn.Linear``.
* ``block_fc > 0`` and ``fc_whitening="delinear"``: ``Delinear(in, num_classes, block=block_fc)``.
* ``block_fc > 0`` and ``fc_whitening="channel_deconv"`` (``--delinear False``): a ``ChannelDeconv(block_fc)``
  on the final feature map (VGG: after ``features``; ResNet: after ``layer4``, before pooling), then
  ``nn.Linear``.

Initialisation is PyTorch's default for every layer, as in the reference (it has no init code; torchvision's
ResNet would use Kaiming-normal convs instead).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn

from seg.models.cifar_zoo import ZOO_ARCHS
from seg.nn import ChannelDeconv, Delinear, FastDeconv

__all__ = [
    "CIFAR_ARCHS",
    "CIFAR_NORMS",
    "CONV_NO_BIAS",
    "FC_WHITENINGS",
    "STEM_N_ITER",
    "VGG_CFGS",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "CifarVGG",
    "build_cifar_model",
]

# A conv factory called as ``conv_layer(in_channels, out_channels, kernel_size=k, stride=s, padding=p)``:
# ``nn.Conv2d`` (with the bias the reference uses) or a ``FastDeconv`` partial with the deconv settings.
ConvLayer = Callable[..., nn.Module]
# ``norm_layer(num_features)``; None means no normalisation (deconvolution whitens inside the conv).
NormLayer = Callable[[int], nn.Module]
# ``classifier_layer(in_features, num_classes)``: ``nn.Linear`` or a ``Delinear`` partial.
ClassifierLayer = Callable[[int, int], nn.Module]

# The ResNet's convs under BatchNorm: no bias, which the norm would cancel (models/resnet.py:26-27).
CONV_NO_BIAS: ConvLayer = partial(nn.Conv2d, bias=False)

CIFAR_NORMS = ("bn", "deconv")  # the norms the reference builds these networks with
FC_WHITENINGS = ("delinear", "channel_deconv")
# The reference's VGG gives the conv that sees the image ``freeze=True, n_iter=15`` (models/vgg.py:57-58):
# its input covariance is ill-conditioned, so it needs more iterations, and the image statistics barely
# change, so they are refreshed only periodically. Its ResNet does not (models/resnet.py:133).
STEM_N_ITER = 15

# models/vgg.py:6-11: output channels of each 3x3 conv, "M" a 2x2 max-pool.
VGG_CFGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}


def _norm(norm_layer: NormLayer | None, channels: int) -> nn.Module:
    # An Identity in place of an absent norm keeps one forward path and adds no state_dict keys.
    return nn.Identity() if norm_layer is None else norm_layer(channels)


class CifarVGG(nn.Module):
    """VGG for 32x32 inputs: ``cfg`` 3x3 convs (padding 1) and 2x2 max-pools, then one classifier layer.

    Args:
        cfg: output channels of each conv, ``"M"`` for a max-pool (see ``VGG_CFGS``); five pools bring a
            32x32 input to 1x1, which the classifier reads flattened.
        num_classes: outputs of the classifier.
        conv_layer: the conv factory (see ``ConvLayer``).
        norm_layer: a norm after every conv, or None for none.
        stem_layer: the factory of the conv that sees the image; ``conv_layer`` when None.
        classifier_layer: the classifier factory, ``nn.Linear`` by default.
        channel_deconv: a module applied to the final feature map before the classifier (the reference's
            ``ChannelDeconv``), or None.
        in_channels: image channels.
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
        num_classes: int = 10,
        conv_layer: ConvLayer = nn.Conv2d,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        stem_layer: ConvLayer | None = None,
        classifier_layer: ClassifierLayer = nn.Linear,
        channel_deconv: nn.Module | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        first = True
        for i, item in enumerate(cfg):
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            if not isinstance(item, int) or isinstance(item, bool) or item < 1:
                raise ValueError(f"VGG cfg entries must be positive ints or 'M', got {item!r} at {i}")
            make = stem_layer if first and stem_layer is not None else conv_layer
            layers.append(make(channels, item, kernel_size=3, stride=1, padding=1))
            first = False
            if norm_layer is not None:
                # No Identity placeholder here: an extra module would shift the Sequential's indices.
                layers.append(norm_layer(item))
            layers.append(nn.ReLU(inplace=True))
            channels = item
        # The reference ends ``features`` with AvgPool2d(1, 1), an identity; kept so the layer list (and its
        # printout) matches it. It comes last, so the indices of the layers before it are torchvision's.
        layers.append(nn.AvgPool2d(kernel_size=1, stride=1))
        self.features = nn.Sequential(*layers)
        self.num_features = channels
        self.channel_deconv = channel_deconv if channel_deconv is not None else nn.Identity()
        self.classifier = classifier_layer(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.channel_deconv(x)
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual (torchvision's layout; the reference's ``BasicBlock``).

    Args:
        inplanes: input channels.
        planes: output channels (``expansion`` = 1).
        stride: stride of the first conv and of the shortcut.
        conv_layer: the conv factory (see ``ConvLayer``).
        norm_layer: a norm after every conv (the shortcut's too), or None for none.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *, conv_layer: ConvLayer,
                 norm_layer: NormLayer | None) -> None:
        super().__init__()
        self.conv1 = conv_layer(inplanes, planes, kernel_size=3, stride=stride, padding=1)
        self.bn1 = _norm(norm_layer, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv_layer(planes, planes, kernel_size=3, stride=1, padding=1)
        self.bn2 = _norm(norm_layer, planes)
        self.downsample = _shortcut(inplanes, planes * self.expansion, stride, conv_layer, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1, 3x3 (strided), 1x1 convs with a residual (torchvision's layout; the reference's ``Bottleneck``).

    Args:
        inplanes: input channels.
        planes: channels of the inner convs; the output has ``expansion`` (4) times as many.
        stride: stride of the 3x3 conv and of the shortcut.
        conv_layer: the conv factory (see ``ConvLayer``).
        norm_layer: a norm after every conv (the shortcut's too), or None for none.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *, conv_layer: ConvLayer,
                 norm_layer: NormLayer | None) -> None:
        super().__init__()
        width = planes * self.expansion
        self.conv1 = conv_layer(inplanes, planes, kernel_size=1, stride=1, padding=0)
        self.bn1 = _norm(norm_layer, planes)
        self.conv2 = conv_layer(planes, planes, kernel_size=3, stride=stride, padding=1)
        self.bn2 = _norm(norm_layer, planes)
        self.conv3 = conv_layer(planes, width, kernel_size=1, stride=1, padding=0)
        self.bn3 = _norm(norm_layer, width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(inplanes, width, stride, conv_layer, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(inplanes: int, outplanes: int, stride: int, conv_layer: ConvLayer,
              norm_layer: NormLayer | None) -> nn.Sequential | None:
    """A 1x1 projection (and its norm) where the shape changes, else None (the identity)."""
    if stride == 1 and inplanes == outplanes:
        return None
    layers = [conv_layer(inplanes, outplanes, kernel_size=1, stride=stride, padding=0)]
    if norm_layer is not None:
        layers.append(norm_layer(outplanes))
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: a 3x3 stride-1 stem without max-pool, four stages, pooling, classifier.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage (stages of 64, 128, 256, 512 planes; strides 1, 2, 2, 2).
        num_classes: outputs of the classifier.
        conv_layer: the conv factory (see ``ConvLayer``).
        norm_layer: a norm after every conv, or None for none.
        stem_layer: the factory of the conv that sees the image; ``conv_layer`` when None.
        classifier_layer: the classifier factory, ``nn.Linear`` by default.
        channel_deconv: a module applied to ``layer4``'s output before pooling (the reference's
            ``ChannelDeconv``), or None.
        in_channels: image channels.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 10,
        conv_layer: ConvLayer = CONV_NO_BIAS,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        stem_layer: ConvLayer | None = None,
        classifier_layer: ClassifierLayer = nn.Linear,
        channel_deconv: nn.Module | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive ints (blocks per stage), got {layers!r}")
        self.inplanes = 64
        self.conv1 = (stem_layer or conv_layer)(in_channels, 64, kernel_size=3, stride=1, padding=1)
        self.bn1 = _norm(norm_layer, 64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, conv_layer, norm_layer)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, conv_layer, norm_layer)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, conv_layer, norm_layer)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, conv_layer, norm_layer)
        self.num_features = 512 * block.expansion
        self.channel_deconv = channel_deconv if channel_deconv is not None else nn.Identity()
        # The reference pools with avg_pool2d(x, 4): the whole 4x4 map of a 32x32 input, i.e. this.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = classifier_layer(self.num_features, num_classes)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int,
                    conv_layer: ConvLayer, norm_layer: NormLayer | None) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(block(self.inplanes, planes, s, conv_layer=conv_layer, norm_layer=norm_layer))
            self.inplanes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.channel_deconv(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _vgg(name: str) -> Callable[..., CifarVGG]:
    def build(num_classes: int, **layers: object) -> CifarVGG:
        return CifarVGG(VGG_CFGS[name], num_classes, **layers)  # type: ignore[arg-type]

    build.__name__ = build.__qualname__ = name
    return build


def _resnet(name: str, block: type[BasicBlock] | type[Bottleneck],
            layers: tuple[int, ...]) -> Callable[..., CifarResNet]:
    def build(num_classes: int, **factories: object) -> CifarResNet:
        return CifarResNet(block, layers, num_classes, **factories)  # type: ignore[arg-type]

    build.__name__ = build.__qualname__ = name
    return build


# Arch name -> builder ``(num_classes, *, conv_layer, norm_layer, stem_layer, classifier_layer,
# channel_deconv)``. ResNet depths: models/resnet.py:180-187. The reference's CLI calls ResNet-18 "resnet".
CIFAR_ARCHS: dict[str, Callable[..., nn.Module]] = {
    **{name: _vgg(name) for name in VGG_CFGS},
    "resnet18": _resnet("resnet18", BasicBlock, (2, 2, 2, 2)),
    "resnet34": _resnet("resnet34", BasicBlock, (3, 4, 6, 3)),
    "resnet50": _resnet("resnet50", Bottleneck, (3, 4, 6, 3)),
    # seg.models.cifar_zoo: builders (num_classes, *, deconv, classifier_layer), see build_cifar_model.
    **ZOO_ARCHS,
}


def build_cifar_model(
    arch: str,
    num_classes: int,
    norm: str,
    *,
    block: int = 64,
    sampling_stride: int = 3,
    n_iter: int = 5,
    eps: float = 1e-5,
    momentum: float = 0.1,
    bias: bool = True,
    sync: bool = False,
    block_fc: int = 0,
    fc_whitening: str = "delinear",
) -> nn.Module:
    """A CIFAR classifier as the reference's ``main.py`` builds it. Defaults are the reference's CLI defaults.

    Args:
        arch: one of ``CIFAR_ARCHS`` (vgg11, vgg13, vgg16, vgg19, resnet18, resnet34, resnet50 and the
            ``seg.models.cifar_zoo`` networks).
        num_classes: outputs (10 for CIFAR-10, 100 for CIFAR-100).
        norm: ``bn`` (Conv + BatchNorm; ResNet convs without bias, VGG convs with, as the reference) or
            ``deconv`` (every conv a ``FastDeconv``, no BatchNorm; the ``cifar_zoo`` networks pin some
            settings per layer as the reference does, and EfficientNet-B0 keeps its blocks' BatchNorm).
        block, sampling_stride, n_iter, eps, momentum, bias: the ``FastDeconv`` settings of every conv
            (``--block``, ``--stride``, ``--deconv-iter``, ``--eps``, ``--bias``; the reference leaves momentum
            at 0.1). VGG's first conv gets ``freeze=True`` and ``n_iter=STEM_N_ITER`` instead of ``n_iter``.
            ``eps``, ``n_iter`` and ``momentum`` also set the classifier's whitening (any norm).
        sync: cross-process statistics for every ``FastDeconv`` and the classifier's whitening (not in the
            reference; for distributed runs).
        block_fc: the classifier's whitening block (``--block-fc``); 0 means none, a plain ``nn.Linear``.
        fc_whitening: with ``block_fc > 0``: ``delinear`` (the reference's default ``--delinear True``): the
            classifier is ``Delinear(block=block_fc)``; ``channel_deconv`` (``--delinear False``): a
            ``ChannelDeconv(block_fc)`` on the final feature map, then ``nn.Linear``.

    Raises:
        ValueError: an unknown arch, norm or fc_whitening, a negative ``block_fc``, or a ``ChannelDeconv``
            block larger than the features it whitens.
    """
    if arch not in CIFAR_ARCHS:
        raise ValueError(f"unknown CIFAR arch {arch!r}; valid: {', '.join(CIFAR_ARCHS)}")
    if norm not in CIFAR_NORMS:
        raise ValueError(f"norm must be one of {', '.join(CIFAR_NORMS)}, got {norm!r}")
    if fc_whitening not in FC_WHITENINGS:
        raise ValueError(f"fc_whitening must be one of {', '.join(FC_WHITENINGS)}, got {fc_whitening!r}")
    if not isinstance(block_fc, int) or isinstance(block_fc, bool) or block_fc < 0:
        raise ValueError(f"block_fc must be an int >= 0 (0: no whitening), got {block_fc!r}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")

    is_vgg = arch.startswith("vgg")
    layers: dict[str, object] = {}
    # main.py:34: partial(FastDeconv, bias, eps, n_iter, block, sampling_stride); momentum at its default.
    deconv = partial(FastDeconv, bias=bias, eps=eps, n_iter=n_iter, momentum=momentum, block=block,
                     sampling_stride=sampling_stride, sync=sync)
    if arch in ZOO_ARCHS:
        # These take the reference's own ``deconv`` argument: None for the BatchNorm model.
        layers["deconv"] = deconv if norm == "deconv" else None
    elif norm == "deconv":
        layers.update(conv_layer=deconv, norm_layer=None)
        if is_vgg:
            layers["stem_layer"] = partial(deconv, freeze=True, n_iter=STEM_N_ITER)
    else:
        layers.update(conv_layer=nn.Conv2d if is_vgg else CONV_NO_BIAS,
                      norm_layer=nn.BatchNorm2d)

    # main.py:38-49: the classifier's whitening does not depend on --deconv.
    if block_fc > 0 and fc_whitening == "delinear":
        layers["classifier_layer"] = partial(Delinear, block=block_fc, eps=eps, n_iter=n_iter, momentum=momentum,
                                             sync=sync)
    model = CIFAR_ARCHS[arch](num_classes, **layers)
    if block_fc > 0 and fc_whitening == "channel_deconv":
        features = model.num_features
        if block_fc > features:
            # The reference only prints an error here and then fails in the forward pass.
            raise ValueError(f"block_fc={block_fc} is larger than the {features} channels ChannelDeconv whitens "
                             f"in {arch}")
        # eps is the run's --eps (1e-5), not ChannelDeconv's own default (1e-2): main.py:47. Assigning the
        # existing attribute keeps its place in the module order (before the classifier).
        model.channel_deconv = ChannelDeconv(block_fc, eps=eps, n_iter=n_iter, momentum=momentum,
                                             sampling_stride=sampling_stride, sync=sync)
    return model
