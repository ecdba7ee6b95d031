"""What a whitening layer's training step asks of the device: no host synchronisation, and a number of aten
operations that does not grow with the batch (no per-image or per-kernel-offset loop) and stays within budget.

Counted with ``TorchDispatchMode`` on CPU (forward and backward): every aten operation the step dispatches,
views included. On a GPU each non-view operation is a kernel launch, and ``_local_scalar_dense`` (``.item()``,
``int(t)``, ``if t:``), ``item`` and ``lift_fresh`` (``torch.tensor(...)`` built from host data) are the
operations that make the host wait for the device or copy to it.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seg.nn import ChannelDeconv, Delinear, FastDeconv, IterNorm
from seg.nn.moments import PatchSampler

SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.lift_fresh"}


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def syncs(self) -> dict[str, int]:
        return {k: v for k, v in self.ops.items() if k in SYNC_OPS}


def _train_step(layer: torch.nn.Module, x: torch.Tensor) -> None:
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(torch.ones_like(y))


def _counted_step(layer: torch.nn.Module, x: torch.Tensor) -> OpCounter:
    with OpCounter() as counter:
        _train_step(layer, x)
    return counter


# (constructor, input shape): every path of the statistics (sampling layouts, schedules, options).
LAYERS = {
    "3x3": (lambda: FastDeconv(16, 8, 3, padding=1, block=8), (2, 16, 12, 12)),
    "3x3 stride 2": (lambda: FastDeconv(8, 8, 3, stride=2, padding=1, block=4), (2, 8, 13, 11)),
    "3x3 dilation 2 (overlap)": (lambda: FastDeconv(8, 8, 3, padding=2, dilation=2, block=8), (2, 8, 10, 9)),
    "1x1": (lambda: FastDeconv(16, 8, 1, block=8), (2, 16, 6, 6)),
    "1x1 uneven offsets": (lambda: FastDeconv(16, 8, 1, block=8), (3, 16, 5, 7)),
    "grouped": (lambda: FastDeconv(8, 8, 3, padding=1, groups=2), (2, 8, 9, 9)),
    "no bias": (lambda: FastDeconv(16, 8, 3, padding=1, block=8, bias=False), (2, 16, 12, 12)),
    "iterate": (lambda: FastDeconv(16, 8, 3, padding=1, block=8, isqrt_method="iterate"), (2, 16, 12, 12)),
    # The stem's n_iter and freeze schedule (a 3×3 kernel: a full-rank covariance from a small image).
    "stem with freeze": (lambda: FastDeconv(3, 8, 3, stride=2, padding=1, n_iter=15, freeze=True, freeze_iter=1),
                         (2, 3, 20, 20)),
    "stats_every": (lambda: FastDeconv(16, 8, 3, padding=1, block=8, stats_every=2), (2, 16, 12, 12)),
    "matrix_grad off": (lambda: FastDeconv(16, 8, 3, padding=1, block=8, matrix_grad=False), (2, 16, 12, 12)),
    "layernorm": (lambda: FastDeconv(16, 8, 3, padding=1, block=8, norm_type="layernorm"), (2, 16, 12, 12)),
    "sync flag without a group": (lambda: FastDeconv(16, 8, 3, padding=1, block=8, sync=True), (2, 16, 12, 12)),
    "IterNorm": (lambda: IterNorm(16, num_channels=8), (2, 16, 6, 6)),
    "ChannelDeconv": (lambda: ChannelDeconv(4, eps=1e-3), (2, 6, 6, 6)),  # a 4-block and 2 standardised
    "ChannelDeconv 2-D": (lambda: ChannelDeconv(4, eps=1e-3), (5, 6)),
    "Delinear": (lambda: Delinear(12, 5, block=4), (5, 12)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_training_steps_never_wait_for_the_device(name):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(*shape) * 1.5 + 0.3
    # Every step from the first (first-batch initialisation, freeze and stats_every schedules included).
    for step in range(4):
        counter = _counted_step(layer, x)
        assert counter.syncs == {}, f"step {step}: {counter.syncs}"


def test_freeze_schedule_still_follows_a_loaded_counter():
    # The host-side copy of the counter follows load_state_dict: a loaded layer freezes when the original does.
    layer = FastDeconv(3, 4, 3, padding=1, freeze=True, freeze_iter=2)
    for _ in range(3):
        layer(torch.randn(1, 3, 8, 8))
    fresh = FastDeconv(3, 4, 3, padding=1, freeze=True, freeze_iter=2)
    fresh.load_state_dict(layer.state_dict())
    before = fresh.running_deconv.clone()
    fresh(torch.randn(1, 3, 8, 8))  # counter 3 > freeze_iter: the running statistics are used, not updated
    assert torch.equal(before, fresh.running_deconv)
    assert int(fresh.counter) == int(layer.counter) + 1


# Aten operations of one training step (forward and backward) of a 3×3 FastDeconv layer with the default
# options on CPU, per form of the inverse square root (``eigh``, the CPU default; ``iterate``, what GPUs run).
# Issue 22 measured 596 before (with batch 2; it grew by 54 per image); 141 after batching, 102 after trimming
# (iterate: 178, then 103 with its hand-written backward pass); 91 and 97 after the second trimming (φ in the
# eigenbasis with one complex quotient for the divided differences, cached constants, the counter written when
# saved, ∂W from the symmetric D).
LAYER_BUDGET = {"eigh": 91, "iterate": 97}


@pytest.mark.parametrize("name", ["3x3", "3x3 dilation 2 (overlap)", "1x1", "1x1 uneven offsets", "grouped",
                                  "iterate", "stem with freeze", "IterNorm", "ChannelDeconv", "Delinear"])
def test_operations_do_not_grow_with_the_batch(name):
    make, shape = LAYERS[name]
    counts = []
    for batch in (shape[0], shape[0] + 3):
        torch.manual_seed(0)
        layer = make()
        x = torch.randn(batch, *shape[1:]) * 1.5 + 0.3
        _train_step(layer, x)  # first-step initialisation and caches out of the way
        counts.append(_counted_step(layer, x).total)
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("method", ["eigh", "iterate"])  # the CPU and the GPU form of the inverse square root
def test_fastdeconv_step_within_the_operation_budget(method):
    torch.manual_seed(0)
    # Two interleaved vectors per patch, as in a ResNet.
    layer = FastDeconv(32, 16, 3, padding=1, block=16, isqrt_method=method)
    x = torch.randn(2, 32, 12, 12)
    _train_step(layer, x)
    counter = _counted_step(layer, x)
    assert counter.total <= LAYER_BUDGET[method], counter.ops.most_common(20)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 16, 9, 11), (2, 16, 5, 7), (3, 16, 5, 7)], ids=["strided", "offsets", "odd"])
def test_1x1_samples_gradient_is_added_into_the_convolution_input_gradient(shape, dtype, monkeypatch):
    # No input-sized zero-filled gradient and no input-sized sum of two gradients: the samples' share is added in
    # place into the convolution's input gradient. The same gradient as the separate form (scatter, then sum).
    torch.manual_seed(0)
    layer = FastDeconv(16, 8, 1, block=8)
    x = torch.randn(*shape, dtype=torch.float64) * 1.5 + 0.3
    if dtype == torch.float64:
        layer = layer.double()
    grads = []
    for in_place in (True, False):
        if not in_place:
            monkeypatch.setattr(PatchSampler, "adds_in_place", lambda self: False)
        torch.manual_seed(1)
        inp = x.to(dtype).requires_grad_()
        with OpCounter() as counter:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                y = layer(inp)
            # The backward pass outside autocast, as in training (inside, autocast would cast for index_put_).
            y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
        assert ("aten.new_zeros" in counter.ops) is not in_place, counter.ops
        grads.append(inp.grad.double())
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[0], grads[1], **tol)


def test_layers_reading_one_half_precision_input_share_one_float32_copy():
    # The ASPP branches: several layers in turn on one bf16 tensor make one float32 copy of it, not one each.
    torch.manual_seed(0)
    branches = [FastDeconv(16, 4, 3, padding=d, dilation=d, block=8) for d in (1, 2, 3)]
    x = (torch.randn(2, 16, 12, 12) + 0.5).bfloat16().requires_grad_()
    casts = []

    class CastsOfX(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten._to_copy and args and args[0] is x:
                casts.append((kwargs or {}).get("dtype"))
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", dtype=torch.bfloat16), CastsOfX():
        outs = [b(x) for b in branches]
    assert casts == [torch.float32]
    sum(o.float().sum() for o in outs).backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    # Each branch's statistics are those of the float32 input, as without sharing.
    for b in branches:
        ref = FastDeconv(16, 4, 3, padding=b.padding, dilation=b.dilation, block=8)
        ref.load_state_dict({**b.state_dict(), "running_mean": torch.zeros_like(b.running_mean),
                             "running_deconv": torch.eye(b.num_features), "counter": torch.zeros((), dtype=torch.long)})
        ref(x.detach().float())
        torch.testing.assert_close(ref.running_deconv, b.running_deconv, rtol=0, atol=0)


# Aten operations of a DeepLabV3-ResNet50 OS 8 training step (forward, loss, backward) with deconvolution,
# relative to the same step with BatchNorm (833; float32, CPU), per form of the inverse square root. Issue 22,
# measured at 2×3×64×64: 27.6× before (22,948; it grew by 833 per image, about 33× at batch 8), 10.1× after
# batching (8,440; no longer growing with the batch, as the per-layer tests check), 7.5× after trimming (6,261;
# iterate 7.6×). After the second trimming, at 2×3×32×32: eigh 5,575 = 6.69×, iterate 5,955 = 7.15×. The image size
# matters only through the 1×1 layers' sample layout: where H·W is a multiple of the sampling step (9) the samples
# are one strided view (48×48 here; 480×480 crops), otherwise an indexed gather (32×32 here; Cityscapes'
# 512×1024 crops), a few operations more per layer: at 48×48, eigh 5,458 = 6.55×, iterate 5,838 = 7.01×.
#
# The goal of 6× (≤ 4,998) is not met, and is out of reach without changing the operator or fusing kernels. The
# same network without normalisation counts 533 (61 convolutions and their backward, ReLUs, adds, upsampling,
# loss, gradient bookkeeping), so 6× leaves (4,998 − 533)/61 ≈ 73 operations per FastDeconv layer beyond its
# conv; they take 82 (eigh) and 89 (iterate) on average now. A 3×3 layer, eigh (the test above counts 91 with the
# input's clone, the gradient seed and the input's gradient accumulation): forward = patch gather 3 (pad,
# strided copy, view), mean and centring 2, covariance 3 (transpose, addmm, mean's view), eigh with c² = ‖μ‖² and
# 1/√c 3, the scalar Newton–Schulz recursion in complex128 at μ + ih, started at (μ·c^{-1/2}, c^{-1/2}) so that it
# ends at φ = q(μ/c)/√c and h·φ' 12 (n_iter = 5: 2 per iteration), D = V·diag(φ)·Vᵀ 6, the divided differences K
# of φ 10 (one complex quotient), slope μφ' + φ/2 and μ/c² 5, running-statistics update 1, fold W·D and bias 7,
# conv 1; backward = conv 1, fold 14 (interleaved gradient with the bias term, ∂W, ∂D, ∂μ), inverse square root 9
# (two changes of basis, the ‖A‖ term), statistics 4, scatter into the input 5 (1×1 layers: 3, added in place
# into the convolution's input gradient), the input's two gradients summed 1 (1×1: none). Each part is a few
# operations on whole tensors (no loops): the count is set by the number of distinct steps of the operator —
# above all the exact inverse square root (45 of the ~82) — not by per-image or per-offset work. A design that
# merges the statistics, the inverse square root, the fold and the conv into one autograd Function still counts
# about 79 per layer (6.5×) by this tally; 6× takes dropping parts of the operator (the gradient through D,
# ``matrix_grad=False``; fewer iterations) or fusing kernels (torch.compile), not rewriting it.
MODEL_BUDGET = {"eigh": 6.7, "iterate": 7.15}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["eigh", "iterate"])
def test_deeplabv3_r50_step_within_the_operation_budget(method):
    import torch.nn.functional as F

    from seg.config import DeconvConfig, ModelConfig
    from seg.models import build_model

    def count(norm: str) -> OpCounter:
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch="deeplabv3", encoder="resnet50", output_stride=8, norm=norm,
                                        deconv=DeconvConfig())).train()
        for layer in model.modules():
            if isinstance(layer, FastDeconv):
                layer.isqrt_method = method
        x, target = torch.randn(2, 3, 32, 32), torch.randint(0, 19, (2, 32, 32))
        F.cross_entropy(model(x)["out"], target).backward()
        model.zero_grad(set_to_none=True)
        with OpCounter() as counter:
            F.cross_entropy(model(x)["out"], target).backward()
        return counter

    bn, deconv = count("bn"), count("deconv")
    assert deconv.syncs == {}
    assert deconv.total <= MODEL_BUDGET[method] * bn.total, (deconv.total, bn.total, deconv.ops.most_common(15))
