"""Augmentation keeps image and mask aligned; random streams differ per worker/rank and repeat per seed."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from seg.config import ConfigError, DataConfig
from seg.data import build_transforms, derive_seed, make_generator, seed_dataset_transforms, worker_init_fn

BLOCK = 8
H, W = 64, 128


def block_pair() -> tuple[np.ndarray, np.ndarray]:
    """An image whose 8x8 blocks encode their (row, col) in R and G, and a mask holding the block number."""
    yy, xx = np.mgrid[0:H, 0:W]
    bi, bj = yy // BLOCK, xx // BLOCK
    image = np.stack([bi * 16 + 8, bj * 16 + 8, np.full_like(bi, 128)], -1).astype(np.uint8)
    mask = (bi * 16 + bj).astype(np.uint8)  # < 255
    return image, mask


def geometric_cfg(**kw) -> DataConfig:
    base = dict(
        crop_size=[48, 96], scale_range=[0.5, 2.0], brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0
    )
    base.update(kw)
    return DataConfig(**base)


def denormalise(t: torch.Tensor, cfg: DataConfig) -> np.ndarray:
    img = t.numpy().transpose(1, 2, 0) * np.array(cfg.std) + np.array(cfg.mean)
    return img * 255.0


@pytest.mark.parametrize("seed", range(6))
def test_image_and_mask_stay_aligned_through_scale_pad_crop_flip(seed):
    cfg = geometric_cfg(crop_size=[72, 136], hflip_prob=0.5)  # crop larger than some scaled images: padding
    image, mask = block_pair()
    tf = build_transforms(cfg, train=True, seed=seed)
    for _ in range(4):
        out = tf(image=image, mask=mask)
        img, m = denormalise(out["image"], cfg), out["mask"].numpy().astype(np.int64)
        assert out["image"].dtype == torch.float32 and tuple(out["image"].shape) == (3, 72, 136)
        assert m.shape == (72, 136)
        pad = m == 255
        assert np.allclose(img[pad], 0, atol=1.0), "padding must be black in the image"
        # interior pixels (3x3 neighbourhood of one block) decode to the block the mask names
        same = np.ones_like(pad)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                same &= np.roll(np.roll(m, dy, 0), dx, 1) == m
        same[[0, -1], :] = False
        same[:, [0, -1]] = False
        inner = same & ~pad
        assert inner.sum() > 100
        rows = np.rint((img[..., 0] - 8) / 16)[inner]
        cols = np.rint((img[..., 1] - 8) / 16)[inner]
        assert (rows == m[inner] // 16).all() and (cols == m[inner] % 16).all()


def test_scale_is_relative_to_the_image_and_pads_with_ignore():
    image, mask = block_pair()
    cfg = geometric_cfg(crop_size=[H, W], scale_range=[0.5, 0.5], hflip_prob=0.0)
    out = build_transforms(cfg, train=True, seed=0)(image=image, mask=mask)
    m = out["mask"].numpy()
    assert (m == 255).sum() == H * W - (H // 2) * (W // 2)
    assert len(np.unique(m[m != 255])) == (H // BLOCK) * (W // BLOCK)  # every block survives, at half size


def test_photometric_jitter_changes_the_image_but_never_the_mask():
    image, mask = block_pair()
    plain = build_transforms(geometric_cfg(), train=True, seed=3)(image=image, mask=mask)
    jitter_cfg = geometric_cfg(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    jittered = build_transforms(jitter_cfg, train=True, seed=3)(image=image, mask=mask)
    assert torch.equal(plain["mask"], jittered["mask"])
    assert not torch.allclose(plain["image"], jittered["image"], atol=1e-3)


def test_val_transform_only_normalises_at_full_resolution():
    image, mask = block_pair()
    cfg = DataConfig()
    out = build_transforms(cfg, train=False)(image=image, mask=mask)
    expected = (image / 255.0 - np.array(cfg.mean)) / np.array(cfg.std)
    np.testing.assert_allclose(out["image"].numpy().transpose(1, 2, 0), expected, atol=1e-5)
    assert np.array_equal(out["mask"].numpy(), mask)


def test_same_seed_same_draws_different_seed_different_draws():
    image, mask = block_pair()
    cfg = geometric_cfg()

    def draws(seed):
        tf = build_transforms(cfg, train=True, seed=seed)
        return [tf(image=image, mask=mask)["mask"] for _ in range(5)]

    a, b, c = draws(1), draws(1), draws(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_bad_data_config_values_are_rejected():
    with pytest.raises(ConfigError, match="data.scale_range"):
        DataConfig(scale_range=[2.0, 0.5])
    with pytest.raises(ConfigError, match="data.crop_size"):
        DataConfig(crop_size=[512])
    with pytest.raises(ConfigError, match="data.hue"):
        DataConfig(hue=0.7)


class SameImage(Dataset):
    """Every index gives the same pair, so any difference between samples comes from the random stream."""

    def __init__(self, transform):
        self.transform = transform
        self.image, self.mask = block_pair()

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.transform(image=self.image, mask=self.mask)["mask"]


def loader_draws(seed: int, rank: int, init=worker_init_fn) -> list[torch.Tensor]:
    ds = SameImage(
        build_transforms(geometric_cfg(), train=True, seed=123)
    )  # same fixed stream in every worker
    loader = DataLoader(
        ds, batch_size=1, num_workers=2, generator=make_generator(seed, rank), worker_init_fn=init
    )
    return [b[0] for b in loader]


def test_workers_and_ranks_draw_different_streams_and_repeat_per_seed():
    run = loader_draws(seed=0, rank=0)
    # batches alternate between the two workers: 0,2,4,6 from worker 0 and 1,3,5,7 from worker 1
    assert not any(torch.equal(run[k], run[k + 1]) for k in range(0, 8, 2))
    assert all(torch.equal(x, y) for x, y in zip(run, loader_draws(seed=0, rank=0), strict=True))
    other_rank = loader_draws(seed=0, rank=1)
    assert not any(torch.equal(x, y) for x, y in zip(run, other_rank, strict=True))
    # without the hook albumentations' own generator is copied into each worker: the trap we guard against
    trap = loader_draws(seed=0, rank=0, init=None)
    assert all(torch.equal(trap[k], trap[k + 1]) for k in range(0, 8, 2))


def test_seed_helpers_are_deterministic_and_distinct():
    assert derive_seed(0, 1) == derive_seed(0, 1)
    assert len({derive_seed(s, r) for s in range(4) for r in range(4)}) == 16
    assert torch.equal(
        torch.randint(0, 10**6, (4,), generator=make_generator(5, 2)),
        torch.randint(0, 10**6, (4,), generator=make_generator(5, 2)),
    )
    image, mask = block_pair()
    ds = SameImage(build_transforms(geometric_cfg(), train=True))
    seed_dataset_transforms(ds, 7)
    first = [ds[0] for _ in range(3)]
    seed_dataset_transforms(ds, 7)
    assert all(torch.equal(x, ds[0]) for x in first)


# --- the paper's code's pipeline (configs/paper/*.yaml) ------------------------------------------------------

PAPER_CONFIG = "configs/paper/deeplabv3_resnet50_deconv.yaml"


def cityscapes_sized_pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (1024, 2048, 3), dtype=np.uint8)
    label = rng.integers(0, 20, (1024, 2048), dtype=np.uint8)  # the paper's ids: void 0, classes 1..19
    return image, label


def test_paper_training_pipeline_draws_a_short_side_in_260_1040_and_crops_480():
    import albumentations as A

    from seg.config import load_config

    cfg = load_config(PAPER_CONFIG).data
    pipeline = build_transforms(cfg, train=True, seed=0)
    # The same steps, recording what each did: the pad's input is the resized (maybe flipped) image.
    recorded = A.Compose(pipeline.transforms, strict=True, save_applied_params=True)
    image, label = cityscapes_sized_pair()
    shorts = []
    for _ in range(12):
        out = recorded(image=image, mask=label)
        assert tuple(out["image"].shape) == (3, 480, 480) and tuple(out["mask"].shape) == (480, 480)
        steps = dict(out["applied_transforms"])
        h, w = steps["PadIfNeeded"]["shape"][:2]
        assert w == 2 * h  # aspect ratio kept
        shorts.append(h)
    assert all(260 <= s <= 1040 for s in shorts) and len(set(shorts)) > 6
    assert [type(t).__name__ for t in pipeline.transforms] == [
        "SmallestMaxSize", "HorizontalFlip", "PadIfNeeded", "RandomCrop", "Normalize", "ToTensorV2"]  # no jitter


def test_paper_training_pipeline_pads_bottom_right_image_0_label_255():
    import dataclasses

    from seg.config import load_config

    cfg = dataclasses.replace(load_config(PAPER_CONFIG).data, short_side_range=[260, 260], hflip_prob=0.0)
    image, label = cityscapes_sized_pair()
    out = build_transforms(cfg, train=True, seed=0)(image=image, mask=label)
    mask, img = out["mask"].numpy(), out["image"]
    # 260 x 520 padded to 480 x 520 at the bottom, then a 480 x 480 crop: rows 260.. are padding.
    assert (mask[260:] == 255).all() and (mask[:260] != 255).all()
    zero = torch.tensor([(0 - m) / s for m, s in zip(cfg.mean, cfg.std, strict=True)])[:, None, None]
    assert torch.allclose(img[:, 260:], zero.expand(-1, 220, 480), atol=1e-5)


def test_paper_validation_resizes_to_short_side_520_label_as_pil_nearest():
    from PIL import Image

    from seg.config import load_config

    cfg = load_config(PAPER_CONFIG).data
    image, label = cityscapes_sized_pair()
    out = build_transforms(cfg, train=False)(image=image, mask=label)
    assert tuple(out["image"].shape) == (3, 520, 1040)
    # The paper's code: F.resize(target, 520, interpolation=Image.NEAREST) on a PIL image.
    expected = np.asarray(Image.fromarray(label).resize((1040, 520), Image.NEAREST))
    assert np.array_equal(out["mask"].numpy(), expected)


def test_short_side_and_pad_fields_are_checked():
    with pytest.raises(ConfigError, match="data.short_side_range"):
        DataConfig(short_side_range=[1040, 260], scale_range=[1.0, 1.0])
    with pytest.raises(ConfigError, match="data.short_side_range"):
        DataConfig(short_side_range=[0, 260], scale_range=[1.0, 1.0])
    with pytest.raises(ConfigError, match=r"data.scale_range.*short_side_range"):
        DataConfig(short_side_range=[260, 1040])  # the default scale_range would draw a second scale
    with pytest.raises(ConfigError, match="data.pad_position"):
        DataConfig(pad_position="bottom")
    with pytest.raises(ConfigError, match="data.val_short_side"):
        DataConfig(val_short_side=0)
    with pytest.raises(ConfigError, match="data.label_mapping"):
        DataConfig(label_mapping="void")
