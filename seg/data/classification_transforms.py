"""albumentations 2.x pipelines for image classification, as in the network-deconvolution paper's code.

The reference (github.com/yechengxi/deconvolution) uses torchvision transforms; these are their
albumentations equivalents, built with ``Compose(strict=True)`` so a misspelt argument is an error:

* CIFAR-10/100 (``main.py``): train ``RandomCrop(32, padding=4)`` (zero padding) + ``RandomHorizontalFlip()``;
  test: no augmentation. Both ``ToTensor()`` + ``Normalize(mean, std)`` with the per-dataset numbers below.
* MNIST / Fashion-MNIST (``main.py``): 28x28 single-channel images, no augmentation in training or test;
  MNIST ``ToTensor()`` + ``Normalize((0.1307,), (0.3081,))``, Fashion-MNIST ``ToTensor()`` only (values in
  [0, 1]: mean 0, std 1 here).
* ImageNet (``main_imagenet.py``): train ``RandomResizedCrop(224)`` (scale 0.08..1, ratio 3/4..4/3) +
  ``RandomHorizontalFlip()``; val ``Resize(256)`` (short side) + ``CenterCrop(224)``; ImageNet mean/std.
  Resizing uses bilinear interpolation, INTER_AREA when shrinking (torchvision/PIL antialias when shrinking);
  output sizes can differ from torchvision's by a pixel (rounding of the long side and of the centre offset).

Pipelines take ``pipeline(image=rgb_uint8_hwc)`` (MNIST: a uint8 HxW grey image) and return ``{"image":
float32 tensor CxHxW}`` (C = 3; 1 for MNIST). They are albumentations ``Compose`` objects, so they support
``set_random_state(np_rng, py_random)``: the per-sample seeding of :class:`seg.engine.sampling.SeededSamples`
and :func:`seg.data.seeding.worker_init_fn` applies.
"""

from __future__ import annotations

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from seg.data.seeding import seed_transform
from seg.errors import UserError

# Per-dataset normalisation, copied from the reference: main.py (transforms.Normalize in the cifar10 and
# cifar100 branches) and main_imagenet.py (``normalize``). They are the reference's numbers, not recomputed:
# the CIFAR-10 std (0.2023, 0.1994, 0.2010) is the widely copied per-pixel-std variant.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2009, 0.1984, 0.2023)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
# The reference's Fashion-MNIST pipeline is ToTensor() alone: pixels / 255, no mean/std.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.0,), (1.0,)

NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "mnist": (MNIST_MEAN, MNIST_STD),
    "fashion_mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}
CIFAR_NAMES = ("cifar10", "cifar100")
MNIST_NAMES = ("mnist", "fashion_mnist")
DATASET_NAMES = tuple(NORMALIZATION)

# Geometry of the reference pipelines.
CIFAR_SIZE = 32
CIFAR_PADDING = 4
IMAGENET_CROP = 224
IMAGENET_RESIZE = 256
IMAGENET_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults
IMAGENET_RATIO = (3.0 / 4.0, 4.0 / 3.0)


class UnknownDatasetError(UserError, ValueError):
    """A classification dataset name that has no transforms/normalisation here; the message lists the names."""


def check_dataset_name(dataset: str, allowed: tuple[str, ...] = DATASET_NAMES) -> str:
    """``dataset`` if it is one of ``allowed``, else :class:`UnknownDatasetError` naming the choices."""
    if dataset not in allowed:
        raise UnknownDatasetError(f"unknown classification dataset {dataset!r}; expected one of {', '.join(allowed)}")
    return dataset


def _finish(steps: list[A.BasicTransform], mean, std, seed: int | None) -> A.Compose:
    steps = [*steps, A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    pipeline = A.Compose(steps, strict=True)
    if seed is not None:
        seed_transform(pipeline, seed)
    return pipeline


def cifar_transforms(
    train: bool,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    size: int = CIFAR_SIZE,
    padding: int = CIFAR_PADDING,
    hflip_prob: float = 0.5,
    seed: int | None = None,
) -> A.Compose:
    """CIFAR-style pipeline. Train: zero-pad ``padding`` pixels on every side, random ``size`` crop (each of
    the (2*padding+1)^2 offsets equally likely), horizontal flip with ``hflip_prob``; then normalise.
    Test: normalise only. ``seed`` fixes the pipeline's stream (None: fresh entropy)."""
    steps: list[A.BasicTransform] = []
    if train:
        if padding > 0:
            steps.append(A.Pad(padding=padding, fill=0, border_mode=cv2.BORDER_CONSTANT))
        steps.append(A.RandomCrop(height=size, width=size))
        if hflip_prob > 0:
            steps.append(A.HorizontalFlip(p=hflip_prob))
    return _finish(steps, mean, std, seed)


def imagenet_transforms(
    train: bool,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    crop: int = IMAGENET_CROP,
    resize: int = IMAGENET_RESIZE,
    scale: tuple[float, float] = IMAGENET_SCALE,
    ratio: tuple[float, float] = IMAGENET_RATIO,
    hflip_prob: float = 0.5,
    seed: int | None = None,
) -> A.Compose:
    """ImageNet-style pipeline. Train: random resized crop to ``crop`` x ``crop`` (area fraction ``scale``,
    aspect ratio ``ratio``) + horizontal flip; val: short side to ``resize``, centre crop ``crop``. Both
    normalise. Images are RGB uint8 of any size."""
    if train:
        steps: list[A.BasicTransform] = [
            A.RandomResizedCrop(
                size=(crop, crop),
                scale=tuple(scale),
                ratio=tuple(ratio),
                interpolation=cv2.INTER_LINEAR,
                area_for_downscale="image",
            )
        ]
        if hflip_prob > 0:
            steps.append(A.HorizontalFlip(p=hflip_prob))
    else:
        steps = [
            A.SmallestMaxSize(max_size=resize, interpolation=cv2.INTER_LINEAR, area_for_downscale="image"),
            A.CenterCrop(height=crop, width=crop),
        ]
    return _finish(steps, mean, std, seed)


def mnist_transforms(mean=MNIST_MEAN, std=MNIST_STD, seed: int | None = None) -> A.Compose:
    """MNIST-style pipeline, the same for training and test (the reference augments neither): scale to
    [0, 1] and normalise; a uint8 HxW grey image becomes a float32 1xHxW tensor."""
    return _finish([], mean, std, seed)


def build_classification_transforms(dataset: str, train: bool, seed: int | None = None) -> A.Compose:
    """The reference pipeline of ``dataset`` (``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist`` or
    ``imagenet``) for training (``train=True``) or evaluation, with the reference's mean/std. Call it as
    ``pipeline(image=rgb)["image"]``.
    """
    check_dataset_name(dataset)
    mean, std = NORMALIZATION[dataset]
    if dataset in CIFAR_NAMES:
        return cifar_transforms(train, mean, std, seed=seed)
    if dataset in MNIST_NAMES:
        return mnist_transforms(mean, std, seed=seed)
    return imagenet_transforms(train, mean, std, seed=seed)
