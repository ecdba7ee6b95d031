"""Image classification (CIFAR-10/100, MNIST, Fashion-MNIST, ImageNet-style class folders): cross-entropy (or
the reference's L2 loss), top-1/top-5 accuracy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from seg.config import Config, ConfigError, check_choice
from seg.data import CifarDataset, DatasetError, ImageFolderDataset, build_classification_transforms
from seg.data.mnist import MnistDataset
from seg.evaluation.topk import evaluate_classification
from seg.events import Event
from seg.models.classifiers import build_classification_model
from seg.tasks.base import DataRootError, Task, register_task

MNIST_DATASETS = ("mnist", "fashion_mnist")  # 1 x 28 x 28 images: model.arch mlp
DATASETS = ("cifar10", "cifar100", *MNIST_DATASETS, "imagenet")  # data.dataset
LOSSES = ("ce", "l2")  # train.loss

CIFAR_HINT = (
    "Set data.root (e.g. --opts data.root=/path/to/cifar) to a folder holding the extracted python version "
    "of {title} (https://www.cs.toronto.edu/~kriz/cifar.html), or try the project without a download: "
    "`python tools/make_cifar_standin.py --root datasets/cifar_standin` writes a small CIFAR-10-format "
    "stand-in (train on it with configs/cifar10/standin_resnet18_deconv.yaml)."
)
IMAGENET_HINT = (
    "Set data.root (e.g. --opts data.root=/path/to/imagenet) to a folder with {train}/<class>/<images> and "
    "{val}/<class>/<images> (the ImageNet ILSVRC-2012 layout once the validation images are sorted into class "
    "folders)."
)


def _data_error(cfg: Config, e: DatasetError) -> DataRootError:
    data = cfg.data
    if data.dataset in MNIST_DATASETS:  # the reader's message already says where the files go: keep one line
        return DataRootError(f"{e} (data.root={data.root}; to try without a download: python "
                             f"tools/make_mnist_standin.py --root {data.root} --kind {data.dataset})")
    if data.dataset == "imagenet":
        hint = IMAGENET_HINT.format(train=data.train_split, val=data.val_split)
    else:
        hint = CIFAR_HINT.format(title="CIFAR-10" if data.dataset == "cifar10" else "CIFAR-100")
    return DataRootError(f"{e}\n\n{hint}")


def _check_num_classes(cfg: Config, dataset: CifarDataset | MnistDataset | ImageFolderDataset) -> None:
    if cfg.model.num_classes != dataset.num_classes:
        raise ConfigError(
            f"key 'model.num_classes' has value {cfg.model.num_classes}, but the {cfg.data.dataset} data at "
            f"{cfg.data.root} has {dataset.num_classes} classes; set model.num_classes={dataset.num_classes}"
        )


def build_classification_eval_dataset(cfg: Config, split: str) -> Dataset:
    """One split of ``cfg.data`` with the evaluation transform (no augmentation), e.g. for ``tools/eval.py``.

    CIFAR: ``train`` is the 50000 training images, any other split name the 10000 test images; MNIST and
    Fashion-MNIST likewise (60000 / 10000). Image folders:
    ``data.root/<split>`` (its class folders must be those of ``data.root/train``). Raises
    :class:`DataRootError` and, when ``model.num_classes`` does not fit the data, :class:`ConfigError`.
    """
    name = cfg.data.dataset
    transform = build_classification_transforms(name, False)
    try:
        if name in ("cifar10", "cifar100"):
            dataset = CifarDataset(cfg.data.root, name, train=split == "train", transform=transform)
        elif name in MNIST_DATASETS:
            dataset = MnistDataset(cfg.data.root, name, train=split == "train", transform=transform)
        else:
            dataset = ImageFolderDataset(cfg.data.root, split, transform)
    except DatasetError as e:
        raise _data_error(cfg, e) from e
    _check_num_classes(cfg, dataset)
    return dataset


def build_classification_datasets(cfg: Config) -> tuple[Dataset, Dataset]:
    """(train, val) of ``cfg.data`` with the reference transforms; the val split is CIFAR's test batch, the
    MNIST / Fashion-MNIST ``t10k`` files or the image folder ``data.val_split`` (whose class folders must be
    those of ``data.train_split``).

    Raises :class:`DataRootError` for a missing or unusable dataset and :class:`ConfigError` when
    ``model.num_classes`` is not the dataset's number of classes.
    """
    data = cfg.data
    name = data.dataset
    try:
        if name in ("cifar10", "cifar100"):
            train_set = CifarDataset(data.root, name, train=True, transform=build_classification_transforms(name, True))
            val_set = CifarDataset(data.root, name, train=False, transform=build_classification_transforms(name, False))
        elif name in MNIST_DATASETS:
            train_set = MnistDataset(data.root, name, train=True, transform=build_classification_transforms(name, True))
            val_set = MnistDataset(data.root, name, train=False, transform=build_classification_transforms(name, False))
        else:
            train_set = ImageFolderDataset(data.root, data.train_split, build_classification_transforms(name, True))
            val_set = ImageFolderDataset(data.root, data.val_split, build_classification_transforms(name, False),
                                         classes=train_set.classes)
    except DatasetError as e:
        raise _data_error(cfg, e) from e
    _check_num_classes(cfg, train_set)
    return train_set, val_set


def l2_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference's ``--loss L2``: ``MSELoss(outputs, one_hot) * num_classes * 0.5``, i.e. half the squared
    error summed over classes, averaged over the batch (in float32)."""
    one_hot = F.one_hot(targets, outputs.shape[1]).float()
    return 0.5 * (outputs.float() - one_hot).square().sum(1).mean()


@register_task
class ClassificationTask(Task):
    name = "classification"
    metric = "top1"
    metric_label = "top-1"
    secondary_metric, secondary_label = "top5", "top-5"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        data, train = cfg.data, cfg.train
        if data.dataset == "cityscapes":
            raise ConfigError("key 'data.dataset' has value 'cityscapes', a segmentation dataset; task "
                              f"'classification' expects one of {', '.join(DATASETS)}")
        check_choice("data.dataset", data.dataset, DATASETS)
        if train.loss == "ohem" or train.class_weights is not None:
            raise ConfigError(f"key 'train.{'loss' if train.loss == 'ohem' else 'class_weights'}' is a "
                              "segmentation setting; task 'classification' expects train.loss ce or l2 and no "
                              "train.class_weights")
        check_choice("train.loss", train.loss, LOSSES)
        if (data.dataset in MNIST_DATASETS) != (cfg.model.arch == "mlp"):
            # The reference's CIFAR and ImageNet networks take 3-channel images; its MLP takes 784 values.
            raise ConfigError(f"key 'model.arch' has value {cfg.model.arch!r} with data.dataset "
                              f"{data.dataset!r}; the 1 x 28 x 28 MNIST / Fashion-MNIST images go with "
                              f"model.arch 'mlp' (the paper's MNIST network) and 'mlp' with them only")

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        train_set, val_set = build_classification_datasets(self.cfg)
        self.val_set = self.limit_val(val_set)
        return train_set, self.val_set

    def build_model(self, *, load_pretrained: bool = True) -> nn.Module:
        return build_classification_model(self.cfg.model, load_pretrained=load_pretrained)

    def build_eval_dataset(self, split: str) -> Dataset:
        return build_classification_eval_dataset(self.cfg, split)

    def summary(self, metrics: dict[str, Any]) -> str:
        return f"top-1 {100 * metrics['top1']:.2f}  top-5 {100 * metrics['top5']:.2f}  ({metrics['num_images']} images)"

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.cfg.train.loss == "l2":
            return l2_loss(outputs, targets)
        return F.cross_entropy(outputs.float(), targets)

    def evaluate(
        self, model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None,
        *, progress: bool = False,
    ) -> dict[str, Any]:
        return evaluate_classification(model, loader, device, amp_dtype, progress=progress)

    def val_event(self, iteration: int, metrics: dict[str, Any], model: nn.Module, device: torch.device) -> Event:
        top1, top5 = metrics["top1"], metrics["top5"]
        return Event(
            "val",
            iteration,
            record={"top1": top1, "top5": top5, "num_images": metrics["num_images"]},
            scalars={"val/top1": top1, "val/top5": top5},
            line=f"val @ {iteration}: top-1 {100 * top1:.2f}  top-5 {100 * top5:.2f}",
        )
