"""Data: Cityscapes label semantics, the dataset, augmentation, seeding and a synthetic Cityscapes."""

from seg.data.cityscapes import CityscapesDataset, DatasetError, prepare_train_ids, read_label
from seg.data.seeding import derive_seed, make_generator, seed_dataset_transforms, worker_init_fn
from seg.data.transforms import build_transforms
from seg.media import read_image_rgb  # kept here for callers of seg.data.read_image_rgb; it lives in seg.media

__all__ = [
    "CityscapesDataset",
    "DatasetError",
    "build_transforms",
    "derive_seed",
    "make_generator",
    "prepare_train_ids",
    "read_image_rgb",
    "read_label",
    "seed_dataset_transforms",
    "worker_init_fn",
]
