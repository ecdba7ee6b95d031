"""What only a CUDA GPU shows (issues 13, 21): mixed-precision training with float32 whitening (every deconvolution
layer within 1% of float32 under autocast, the stem convolving in float32), ``amp: auto`` by the GPU, the Newton–Schulz
iterations (``isqrt_method: iterate``, the CUDA default) against the eigendecomposition form, fold and
TorchScript export on the GPU, NCCL and SyncBatchNorm, IterNorm under autocast.

Every test is marked ``gpu`` (deselected by the default ``addopts``; run them with ``pytest -m gpu``, as
``benchmarks/gpu_check.sh`` does) and skipped where torch sees no CUDA device. ``DECONVSEG_TEST_DEVICE=cpu`` runs
the same tests on the CPU (gloo instead of NCCL, bf16 only) to check their logic on a machine without a GPU.
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import seg.distributed
import seg.models.norms as norms
import seg.nn.deconv as deconv_module
import seg.nn.iternorm as iternorm_module
import seg.nn.sync as sync_module
from seg.config import ModelConfig, from_dict
from seg.engine.distributed import DistInfo
from seg.engine.optim import build_optimizer, build_scheduler
from seg.engine.trainer import StepTimer, resolve_amp, train_step
from seg.export import export_torchscript, prepare
from seg.models import build_model
from seg.nn import FastDeconv, IterNorm, fold_deconv
from seg.nn.isqrt import isqrt
from seg.tasks import build_task

DEVICE = torch.device(os.environ.get("DECONVSEG_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 autocast and its GradScaler are the CUDA path; a CPU run of these tests checks bf16 only.
AMPS = ["bf16", pytest.param("fp16", marks=pytest.mark.skipif(not ON_CUDA, reason="fp16 AMP is the CUDA path"))]


@pytest.fixture(autouse=True)
def full_float32():
    """Float32 references in true float32: no TF32 matmuls or convolutions while a test runs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _small_model_cfg(norm: str, **extra) -> ModelConfig:
    return ModelConfig(arch="deeplabv3", encoder="resnet18", output_stride=16, norm=norm, **extra)


def _batch(n: int = 2, size: tuple[int, int] = (128, 256), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, *size, generator=g)
    y = torch.randint(0, 19, (n, *size), generator=g)
    y[:, :8] = 255  # some ignored pixels, as Cityscapes has
    return x, y


def _float32_statistics(model: nn.Module) -> list[torch.Tensor]:
    """The whitening buffers of every FastDeconv and IterNorm layer."""
    bufs = []
    for m in model.modules():
        if isinstance(m, FastDeconv):
            bufs += [m.running_mean, m.running_deconv]
        elif isinstance(m, IterNorm):
            bufs += [m.running_mean, m.running_wm]
    return bufs


# -- mixed precision -------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["deconv", "iternorm"])
@pytest.mark.parametrize("amp", AMPS)
def test_engine_amp_training_steps_stay_finite(amp: str, norm: str, tmp_path) -> None:
    # The trainer's own step (autocast, GradScaler for fp16, the loss all-reduce and its finiteness check) on
    # DeepLabV3-ResNet-18, OS 16, 128x256, as build_run sets it up.
    cfg = from_dict({"model": {"arch": "deeplabv3", "encoder": "resnet18", "output_stride": 16, "norm": norm},
                     "train": {"amp": amp, "lr": 0.01, "iterations": 100, "batch_size": 2}})
    task = build_task(cfg)
    torch.manual_seed(0)
    model = task.build_model().to(DEVICE)
    optimizer = build_optimizer(model, cfg.train)
    amp_dtype = resolve_amp(amp, DEVICE) if ON_CUDA else DTYPES[amp]
    assert amp_dtype == DTYPES[amp]
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=amp_dtype == torch.float16)
    run = SimpleNamespace(cfg=cfg, info=DistInfo(0, 1, 0, DEVICE), task=task, model=model, ddp_model=model,
                          optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg.train), scaler=scaler,
                          amp_dtype=amp_dtype, checkpointer=SimpleNamespace(work_dir=tmp_path))
    before = [p.detach().clone() for p in model.parameters()]
    batches = iter([_batch(seed=i) for i in range(6)])
    timer = StepTimer()
    losses = [train_step(run, batches, False, i, timer)[0] for i in range(6)]  # raises on a non-finite loss

    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))  # steps were taken
    stats = _float32_statistics(model)
    assert stats and all(b.dtype == torch.float32 and torch.isfinite(b).all() for b in stats)
    assert scaler.is_enabled() == (amp == "fp16")
    if scaler.is_enabled():
        assert 0 < scaler.get_scale() < float("inf")


@pytest.mark.parametrize("amp", AMPS)
def test_fastdeconv_whitens_in_float32_under_autocast(amp: str) -> None:
    dtype = DTYPES[amp]
    torch.manual_seed(0)
    layer = FastDeconv(64, 32, 3, padding=1, block=64).to(DEVICE)  # isqrt_method auto: iterate on CUDA
    ref = copy.deepcopy(layer)
    x = (torch.randn(4, 64, 24, 24) * 3 + 1).to(DEVICE)
    x_amp = x.clone().requires_grad_()
    y32 = ref(x)
    with torch.autocast(DEVICE.type, dtype=dtype):
        y = layer(x_amp)
    assert y.dtype == dtype  # what a plain conv gives under the same autocast
    assert torch.isfinite(y).all()
    # Only the convolution ran in half precision: the output is the float32 one within a bf16/fp16 tolerance ...
    assert (y.float() - y32).abs().max() / y32.abs().max() < 0.05
    # ... and the statistics are the float32 ones (half-precision covariances would be off by ~1e-2).
    assert layer.running_mean.dtype == torch.float32 and layer.running_deconv.dtype == torch.float32
    torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_deconv, ref.running_deconv, rtol=1e-4, atol=1e-5)
    y.float().square().mean().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()
    assert torch.isfinite(x_amp.grad).all()
    # Eval mode folds the float32 running statistics: the same within the tolerance.
    layer.eval(), ref.eval()
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=dtype):
        y_eval = layer(x)
    with torch.no_grad():
        y_eval32 = ref(x)
    assert (y_eval.float() - y_eval32).abs().max() / y_eval32.abs().max() < 0.05


@pytest.mark.parametrize("amp", AMPS)
def test_every_deconv_layer_within_one_percent_under_autocast(amp: str, synthetic_root) -> None:
    # tests/test_nn_deconv_amp.py on the device: each FastDeconv layer of a deconvolution DeepLabV3, on the input
    # it sees in float32 on synthetic photos, under autocast against float32 (TF32 off), training and eval mode.
    from tests.test_nn_deconv_amp import _errors, _layer_inputs, _photos, _warmed

    torch.manual_seed(0)
    x = _photos(synthetic_root)
    model = _warmed(build_model(_small_model_cfg("deconv")), x)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FastDeconv)}
    inputs = _layer_inputs(model, x)
    for mode in ("train", "eval"):
        errors = _errors(layers, inputs, mode, DEVICE, DTYPES[amp])
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 0.01, f"{amp} {mode}: {worst} off by {errors[worst]:.2%} (all: {errors})"


@pytest.mark.skipif(not ON_CUDA, reason="the GPU's own capability")
def test_amp_auto_follows_this_gpus_native_bf16() -> None:
    major, _ = torch.cuda.get_device_capability(DEVICE)
    assert resolve_amp("auto", DEVICE) == (torch.bfloat16 if major >= 8 else torch.float16)


@pytest.mark.parametrize("amp", AMPS)
def test_iternorm_whitens_in_float32_under_autocast(amp: str) -> None:
    dtype = DTYPES[amp]
    torch.manual_seed(3)
    layer = IterNorm(64, num_channels=16).to(DEVICE)
    ref, rounded = copy.deepcopy(layer), copy.deepcopy(layer)
    x = (torch.randn(4, 64, 12, 12) * 10 + 30).to(DEVICE)
    y32 = ref(x)
    with torch.autocast(DEVICE.type, dtype=dtype):
        y_float_in = layer(x)
        y_half_in = rounded(x.to(dtype))
    assert y_float_in.dtype == torch.float32 and y_half_in.dtype == dtype  # the input's dtype
    assert torch.isfinite(y_half_in).all()
    # A float32 input under autocast: exactly the float32 computation.
    torch.testing.assert_close(y_float_in, y32, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.running_wm, ref.running_wm, rtol=1e-4, atol=1e-5)
    # A half-precision input: statistics of the rounded input, computed in float32.
    assert rounded.running_wm.dtype == torch.float32 and rounded.running_mean.dtype == torch.float32
    assert (y_half_in.float() - y32).abs().max() < 0.1
    torch.testing.assert_close(rounded.running_wm, ref.running_wm, rtol=2e-2, atol=2e-3)
    y_half_in.float().sum().backward()
    assert torch.isfinite(rounded.weight.grad).all()


# -- the inverse square root: iterations against the eigendecomposition -----------------------------------


def _spd(d: int, n: int, dtype: torch.dtype, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """A covariance-like SPD matrix (eigenvalues spread over two decades plus eps), on DEVICE."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*batch, n, d, generator=g, dtype=torch.float64) * torch.linspace(0.05, 3, d, dtype=torch.float64)
    x = x + 0.7
    a = x.transpose(-1, -2) @ x / n + 1e-5 * torch.eye(d, dtype=torch.float64)
    return a.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_isqrt_iterate_equals_eigh(dtype: torch.dtype, rel: float) -> None:
    # A 3x3 layer's matrices: k²·block = 9·64 = 576 features, two groups.
    a = _spd(576, 4000, dtype, batch=(2,))
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    d1, d2 = isqrt(a1, 5, "iterate"), isqrt(a2, 5, "eigh")
    torch.testing.assert_close(d2, d1, rtol=0, atol=rel * d1.abs().max().item())
    grad = torch.randn(d1.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(d1)
    (g1,) = torch.autograd.grad(d1, a1, grad)
    (g2,) = torch.autograd.grad(d2, a2, grad)
    torch.testing.assert_close(g2, g1, rtol=0, atol=10 * rel * g1.abs().max().item())
    if ON_CUDA:  # auto takes the iterations on CUDA
        d_auto, d_iter = isqrt(a, 5, "auto"), isqrt(a, 5, "iterate")
        torch.testing.assert_close(d_auto, d_iter, rtol=0, atol=1e-6 * d_iter.abs().max().item())


def test_fastdeconv_iterate_equals_eigh() -> None:
    torch.manual_seed(1)
    layers = {m: FastDeconv(64, 32, 3, padding=1, block=64, isqrt_method=m).to(DEVICE) for m in ("iterate", "eigh")}
    layers["eigh"].load_state_dict(layers["iterate"].state_dict())
    x = (torch.randn(4, 64, 24, 24) * 2 - 1).to(DEVICE)
    outs = {}
    for method, layer in layers.items():
        y = layer(x)
        y.square().mean().backward()
        outs[method] = y.detach()
    scale = outs["iterate"].abs().max().item()
    torch.testing.assert_close(outs["eigh"], outs["iterate"], rtol=0, atol=1e-4 * scale)
    gi, ge = layers["iterate"].weight.grad, layers["eigh"].weight.grad
    torch.testing.assert_close(ge, gi, rtol=0, atol=1e-3 * gi.abs().max().item())
    torch.testing.assert_close(layers["eigh"].running_deconv, layers["iterate"].running_deconv, rtol=1e-4, atol=1e-5)


# -- fold and export --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_deconv_model() -> nn.Module:
    """DeepLabV3-ResNet-18 OS 16 with deconvolution on DEVICE, running statistics from two training forwards."""
    torch.manual_seed(0)
    model = build_model(_small_model_cfg("deconv")).to(DEVICE)
    model.train()
    with torch.no_grad():
        for seed in (1, 2):
            model(_batch(seed=seed)[0].to(DEVICE))
    return model.eval()


def test_fold_equals_the_deconvolution_model(trained_deconv_model: nn.Module) -> None:
    x = _batch(seed=3)[0].to(DEVICE)
    folded = fold_deconv(copy.deepcopy(trained_deconv_model)).eval()
    assert not any(isinstance(m, FastDeconv) for m in folded.modules())
    assert all(p.device.type == DEVICE.type for p in folded.parameters())
    with torch.no_grad():
        y, y_folded = trained_deconv_model(x)["out"], folded(x)["out"]
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            y_amp = folded(x)["out"]
    torch.testing.assert_close(y_folded, y, rtol=0, atol=1e-4 * y.abs().max().item())
    assert torch.isfinite(y_amp).all() and (y_amp.float() - y).abs().max() < 0.05 * y.abs().max()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_on_the_device(trained_deconv_model: nn.Module, tmp_path) -> None:
    wrapped = prepare(trained_deconv_model)
    sample = _batch(seed=4)[0].to(DEVICE)
    path = export_torchscript(wrapped, sample, tmp_path / "model.pt")
    loaded = torch.jit.load(str(path), map_location=DEVICE)
    for x in (sample, _batch(1, (96, 200), seed=5)[0].to(DEVICE)):  # another N, H, W than the traced one
        with torch.no_grad():
            ref, got = wrapped(x), loaded(x)
        assert got.shape == (x.shape[0], 19, *x.shape[2:])
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


# -- process groups: NCCL, SyncBatchNorm ------------------------------------------------------------------


@pytest.fixture
def one_process_group(tmp_path):
    """A one-process group (NCCL on CUDA, gloo on CPU) through a FileStore in tmp_path."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    backend = "nccl" if ON_CUDA else "gloo"
    kwargs = {"device_id": torch.device("cuda", torch.cuda.current_device())} if ON_CUDA else {}
    dist.init_process_group(backend, store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            **kwargs)
    yield backend
    dist.destroy_process_group()


def test_all_reduce_and_the_differentiable_sum(one_process_group: str) -> None:
    t = torch.arange(4.0, device=DEVICE)
    dist.all_reduce(t)
    torch.testing.assert_close(t, torch.arange(4.0, device=DEVICE))
    x = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    y = sync_module._AllReduceSum.apply(x)  # what synced statistics run, forward and backward
    (y * 2).sum().backward()
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    assert not seg.distributed.is_distributed()  # one process: nothing to sync


@pytest.mark.parametrize("layer", ["deconv", "iternorm"])
def test_synced_statistics_over_the_group_equal_local_ones(one_process_group: str, layer: str, monkeypatch) -> None:
    # With one process the all-reduces are the identity: forcing the synced path runs every collective of
    # FastDeconv/IterNorm (forward and backward) over the group and must give the local result.
    torch.manual_seed(2)
    make = (lambda sync: FastDeconv(32, 16, 3, padding=1, block=32, sync=sync)) if layer == "deconv" \
        else (lambda sync: IterNorm(32, num_channels=16, sync=sync))
    local, synced = make(False).to(DEVICE), make(True).to(DEVICE)
    synced.load_state_dict(local.state_dict())
    for module in (sync_module, deconv_module, iternorm_module):
        monkeypatch.setattr(module, "is_distributed", lambda: True)
    x = torch.randn(2, 32, 16, 16, device=DEVICE)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [m(xi) for m, xi in zip((local, synced), xs)]
    for y in ys:
        y.square().mean().backward()
    torch.testing.assert_close(ys[1], ys[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-6)


def _batchnorm_kinds(model: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts


def test_one_process_keeps_batchnorm(one_process_group: str) -> None:
    # The build's decision (sync_statistics): statistics span processes only with more than one.
    assert norms.world_size() == 1
    assert "SyncBatchNorm" not in _batchnorm_kinds(build_model(_small_model_cfg("bn")))


@pytest.mark.skipif(not ON_CUDA, reason="SyncBatchNorm conversion happens on CUDA only")
def test_several_processes_convert_batchnorm_to_syncbatchnorm(one_process_group: str, monkeypatch) -> None:
    # The conversion needs a world size above one; this session has one GPU, so the build is told there are two,
    # and the converted model then trains in the (one-process) NCCL group.
    torch.manual_seed(0)
    plain = build_model(_small_model_cfg("bn")).to(DEVICE)
    monkeypatch.setattr(norms, "world_size", lambda: 2)
    torch.manual_seed(0)
    synced = build_model(_small_model_cfg("bn")).to(DEVICE)
    n_bn = sum(_batchnorm_kinds(plain).values())
    assert n_bn > 0 and _batchnorm_kinds(synced) == {"SyncBatchNorm": n_bn}
    x, _ = _batch()
    x = x.to(DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_plain, y_synced = plain(x)["out"], synced(x)["out"]
    y_synced.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in synced.parameters() if p.grad is not None)
    # One process: SyncBatchNorm normalises with the local batch, as BatchNorm does.
    torch.testing.assert_close(y_synced.float(), y_plain.float(), rtol=0, atol=2e-2 * y_plain.abs().max().item())
