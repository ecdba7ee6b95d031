"""ConfusionMatrix against hand-computed matrices; evaluate() against a per-image float64 reference."""

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from seg.evaluation import ConfusionMatrix, ShardedEvalSampler, evaluate, format_table
from seg.evaluation.evaluator import benchmark_from_reference, real_batches, reference_miou


def test_hand_computed_matrix_with_ignored_pixels_and_absent_class():
    # 4 classes; class 3 appears nowhere (neither target nor prediction); two pixels are ignored.
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 2]])  # predictions on ignored pixels (3, 2) must not count
    cm = ConfusionMatrix(num_classes=4, ignore_index=255)
    cm.update(pred, target)
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(cm.mat, expected)
    m = cm.compute()
    # IoU_c = TP / (TP + FP + FN): class 0: 1/(1+1+1), class 1: 2/(2+1+0), class 2: 1/(1+0+1)
    iou = [1 / 3, 2 / 3, 1 / 2]
    assert m["iou"][:3] == pytest.approx(iou)
    assert math.isnan(m["iou"][3])
    assert m["miou"] == pytest.approx(sum(iou) / 3)  # the absent class is left out of the mean
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["macc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["num_pixels"] == 6


def test_class_only_predicted_counts_with_zero_iou():
    cm = ConfusionMatrix(num_classes=3, ignore_index=255)
    cm.update(torch.tensor([0, 2, 2]), torch.tensor([0, 0, 0]))
    m = cm.compute()
    assert m["iou"][0] == pytest.approx(1 / 3)
    assert m["iou"][2] == 0.0  # predicted but never present: union > 0, IoU 0, in the mean
    assert math.isnan(m["iou"][1])
    assert m["miou"] == pytest.approx(1 / 6)


def test_accumulates_over_updates_and_random_against_numpy():
    rng = np.random.default_rng(0)
    n = 19
    cm = ConfusionMatrix(num_classes=n)
    ref = np.zeros((n, n), np.int64)
    for _ in range(3):
        t = rng.integers(0, n, size=(2, 8, 16))
        t[rng.random(t.shape) < 0.2] = 255
        p = rng.integers(0, n, size=t.shape)
        cm.update(torch.from_numpy(p), torch.from_numpy(t))
        for a, b in zip(t.ravel(), p.ravel(), strict=True):
            if a != 255:
                ref[a, b] += 1
    assert np.array_equal(cm.mat.numpy(), ref)


def test_out_of_range_ids_are_errors():
    cm = ConfusionMatrix(num_classes=19)
    with pytest.raises(ValueError, match="target contains class id 19"):
        cm.update(torch.tensor([0]), torch.tensor([19]))
    with pytest.raises(ValueError, match="prediction contains class id 20"):
        cm.update(torch.tensor([20]), torch.tensor([0]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))


def test_format_table_lists_every_class():
    cm = ConfusionMatrix(num_classes=3)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    text = format_table(cm.compute(), ["road", "sidewalk", "building"])
    assert "road" in text and "building" in text and "n/a" in text and "mIoU 100.00" in text


class _Constant(torch.nn.Module):
    """Predicts, per pixel, the class encoded in the first input channel (for a known answer)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        cls = x[:, 0].round().long().clamp(0, self.num_classes - 1)
        return {"out": torch.nn.functional.one_hot(cls, self.num_classes).permute(0, 3, 1, 2).float()}


def _toy_data(n_images=5, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, n, (n_images, 8, 8), generator=g)
    targets[:, :2] = 255
    preds = torch.where(torch.rand(targets.shape, generator=g) < 0.7, targets.clamp(max=n - 1), 0)
    preds[targets == 255] = 1
    images = preds[:, None].float().expand(-1, 3, -1, -1).contiguous()
    return images, targets, preds


def test_evaluate_matches_direct_confusion_matrix():
    images, targets, preds = _toy_data()
    loader = DataLoader(TensorDataset(images, targets), batch_size=2)
    seen = []
    res = evaluate(_Constant(4), loader, "cpu", num_classes=4, on_batch=lambda idx, p, t: seen.extend(idx))
    direct = ConfusionMatrix(4)
    direct.update(preds, targets)
    assert res["miou"] == pytest.approx(direct.compute()["miou"])
    assert res["num_images"] == 5 and seen == [0, 1, 2, 3, 4]


def test_distributed_sampler_padding_is_not_counted():
    # Simulate the shards of 2 processes of a DistributedSampler over 5 images: rank 1 gets a repeat of
    # image 0. Summed over the shards, each image must count exactly once.
    images, targets, preds = _toy_data()
    ds = TensorDataset(images, targets)
    total = torch.zeros(4, 4, dtype=torch.int64)
    n_images = 0
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=False)
        res = evaluate(_Constant(4), DataLoader(ds, batch_size=2, sampler=sampler), "cpu", num_classes=4)
        total += torch.tensor(res["confusion_matrix"])
        n_images += res["num_images"]
    direct = ConfusionMatrix(4)
    direct.update(preds, targets)
    assert n_images == 5
    assert torch.equal(total, direct.mat)


def test_real_batches_drop_the_padding_and_give_offsets():
    # 5 samples over 2 processes: rank 1's shard is [1, 3, 0], the last a repeat that evens out the shards.
    ds = TensorDataset(torch.arange(5), torch.arange(5))
    per_rank = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=False)
        loader = DataLoader(ds, batch_size=2, sampler=sampler)
        per_rank.append([(offset, x.tolist()) for offset, x, _ in real_batches(loader)])
    assert per_rank == [[(0, [0, 2]), (2, [4])], [(0, [1, 3])]]  # rank 1's trimmed, empty batch is skipped
    plain = DataLoader(ds, batch_size=2)  # no padding: every batch as it is
    assert [(offset, x.tolist()) for offset, x, _ in real_batches(plain)] == [(0, [0, 1]), (2, [2, 3]), (4, [4])]


def test_sharded_sampler_covers_each_index_once():
    ds = TensorDataset(torch.zeros(7))
    shards = [list(ShardedEvalSampler(ds, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))


def test_reference_compat_scores_void_as_class_and_averages_all_21():
    cm = ConfusionMatrix(21, ignore_index=None)
    # void (0) is a scored class; classes never seen count as IoU 0 in the 21-way average.
    cm.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 1, 1]))
    expected = (1 / 1 + 2 / 3 + 0) / 21
    assert reference_miou(cm) == pytest.approx(expected)


def test_evaluate_reference_compat_counts_void_and_resizes_to_short_side_520():
    images, targets, _ = _toy_data(n_images=2)
    loader = DataLoader(TensorDataset(images, targets), batch_size=2)
    res = evaluate(_Constant(4), loader, "cpu", num_classes=4, reference_compat=True)
    # Recompute by hand: resize to 520x520 as PIL does (labels nearest by pixel centre, images bilinear),
    # void -> 0, classes +1; the 4-output model's predictions shift by one as well (it has no void output).
    t = torch.nn.functional.interpolate(targets[:, None].float(), size=(520, 520), mode="nearest-exact")[:, 0].long()
    p = torch.nn.functional.interpolate(images[:, :1], size=(520, 520), mode="bilinear", align_corners=False,
                                        antialias=True)
    p = p[:, 0].round().long().clamp(0, 3)
    cm = ConfusionMatrix(21, ignore_index=None)
    cm.update(p + 1, torch.where(t == 255, 0, t + 1))
    assert res["miou_reference"] == pytest.approx(reference_miou(cm))
    assert res["num_pixels"] == int((t != 255).sum()) and "NOT the benchmark" in res["note"]
    # miou stays the 19-class metric of the same predictions: void pixels left out.
    standard = ConfusionMatrix(19)
    standard.update(p, t)
    assert res["miou"] == pytest.approx(standard.compute()["miou"])
    assert res["iou"] == pytest.approx(standard.compute()["iou"], nan_ok=True)
    assert len(res["iou_reference"]) == 21 and len(res["confusion_matrix"]) == 21


def test_benchmark_from_reference_counts_a_void_prediction_as_a_miss():
    cm = ConfusionMatrix(21, ignore_index=255)
    # targets (reference ids): road (1) x3, sidewalk (2) x1, void (0) x2; predictions: road, void, road,
    # sidewalk on the classes, road and sidewalk on void (left out of the 19-class scores).
    cm.update(torch.tensor([1, 0, 1, 2, 1, 2]), torch.tensor([1, 1, 1, 2, 0, 0]))
    res = benchmark_from_reference(cm)
    # road: TP 2, FN 1 (the void prediction), FP 0 -> 2/3; sidewalk: 1/1; every other class absent.
    assert res["iou"][:2] == pytest.approx([2 / 3, 1.0])
    assert all(v != v for v in res["iou"][2:]) and len(res["iou"]) == 19
    assert res["miou"] == pytest.approx((2 / 3 + 1) / 2)
    assert res["acc"] == pytest.approx(3 / 4) and res["num_pixels"] == 4
    # the paper's mean: void IoU 0/ (2 + 1) = 0, road 2/4, sidewalk 1/2, 18 zeros
    assert reference_miou(cm) == pytest.approx((0 + 2 / 4 + 1 / 2) / 21)


def test_evaluate_21_output_model_on_reference_masks():
    # A 21-output model on masks already in the paper's ids (void 0, padding 255 left out).
    targets = torch.tensor([[[1, 1, 0, 255], [2, 2, 0, 3]]])
    preds = torch.tensor([[[1, 0, 0, 5], [2, 20, 1, 3]]])
    images = preds[:, None].float().expand(-1, 3, -1, -1).contiguous()
    model = _Constant(21)
    model.config = type("C", (), {"num_classes": 21})()  # what Predictor reads the output count from
    res = evaluate(model, DataLoader(TensorDataset(images, targets)), "cpu", reference_targets=True)
    cm = ConfusionMatrix(21)
    cm.update(preds, targets)
    assert torch.equal(torch.tensor(res["confusion_matrix"]), cm.mat)
    assert res["miou"] == pytest.approx(benchmark_from_reference(cm)["miou"])
    assert res["miou_reference"] == pytest.approx(reference_miou(cm))
