"""Data: Cityscapes label semantics, the dataset, augmentation, seeding and a synthetic Cityscapes; CIFAR and
class-folder classification datasets, their transforms and a CIFAR-10-format stand-in."""

from seg.data.cifar import CifarDataset
from seg.data.cifar_standin import generate_cifar10_standin
from seg.data.cityscapes import CityscapesDataset, DatasetError, prepare_train_ids
from seg.data.classification_transforms import build_classification_transforms
from seg.data.imagefolder import ImageFolderDataset
from seg.data.seeding import derive_seed, make_generator, seed_dataset_transforms, worker_init_fn
from seg.data.transforms import build_transforms

__all__ = [
    "CifarDataset",
    "CityscapesDataset",
    "DatasetError",
    "ImageFolderDataset",
    "build_classification_transforms",
    "build_transforms",
    "derive_seed",
    "generate_cifar10_standin",
    "make_generator",
    "prepare_train_ids",
    "seed_dataset_transforms",
    "worker_init_fn",
]
