"""DDP and device settings of the training engine (issue 21): replicas stay identical under DDP with an unequal
batch split and no buffer broadcast, a broken-weights check every rank agrees on, SyncBatchNorm by the run's
device, ``amp: auto`` by the GPU's compute capability, cuDNN and data-worker settings."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import cv2
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

import seg.models.norms as norms
from seg.config import ConfigError, ModelConfig, TrainConfig
from seg.engine import trainer
from seg.models import build_model
from seg.nn import FastDeconv
from tests.dist_sync_worker import run_two_ranks


def _small(norm: str) -> nn.Module:
    return build_model(ModelConfig(arch="deeplabv3", encoder="resnet18", output_stride=16, norm=norm))


@pytest.mark.slow  # two gloo processes train DDP
def test_ddp_replicas_stay_identical_with_a_3_2_split_and_all_ranks_see_broken_weights(tmp_path: Path) -> None:
    ranks = run_two_ranks("dist_ddp_worker.py", tmp_path)
    assert [r["broadcast"] for r in ranks] == [False, False]  # synced statistics: no buffer broadcast
    a, b = (r["state"] for r in ranks)
    assert a.keys() == b.keys() and any("running_deconv" in k for k in a)
    for key in a:  # bitwise: DDP's averaged gradients and the synced statistics are the same on both ranks
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(ranks[0]["losses"], ranks[1]["losses"])  # the ranks did see different samples
    # Rank 1 broke its weights; both raised in the same save (neither waits for the other).
    for r in ranks:
        assert "not finite" in r["save_error"] and "[1]" in r["save_error"]
    assert not (tmp_path / "run" / "last.pth").exists()


def test_buffers_identical_by_construction_only_without_plain_batchnorm() -> None:
    assert trainer.buffers_identical_by_construction(_small("deconv"))
    assert trainer.buffers_identical_by_construction(_small("gn"))
    bn = _small("bn")
    assert not trainer.buffers_identical_by_construction(bn)  # per-rank statistics (CPU): DDP broadcasts them
    assert trainer.buffers_identical_by_construction(nn.SyncBatchNorm.convert_sync_batchnorm(bn))


def _kinds(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_syncbatchnorm_follows_the_runs_device_not_the_machine(gloo_group, monkeypatch) -> None:
    monkeypatch.setattr(norms, "world_size", lambda: 2)  # the build's decision as with two processes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine...
    with pytest.warns(UserWarning, match="SyncBatchNorm does not run on CPU"):
        assert _kinds(_small("bn")) == {"BatchNorm2d"}  # ...running on CPU (a gloo group): plain BatchNorm
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")  # the group of --device cuda
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _kinds(_small("bn")) == {"SyncBatchNorm"}


@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_amp_auto_takes_fp16_where_bf16_is_not_native(monkeypatch, capability, dtype) -> None:
    # V100 (7.0) and T4 (7.5) only emulate bf16; is_bf16_supported() would say yes to both.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda", 0)
    assert trainer.resolve_amp("auto", cuda) == dtype
    assert trainer.resolve_amp("bf16", cuda) == torch.bfloat16  # asked for explicitly: as asked
    assert trainer.resolve_amp("auto", torch.device("cpu")) is None


@pytest.mark.parametrize("deterministic", [False, True])
def test_cudnn_benchmark_unless_deterministic(monkeypatch, deterministic: bool) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", deterministic)  # the opposite of what is expected
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", not deterministic)
    trainer.configure_backends(TrainConfig(deterministic=deterministic), torch.device("cuda", 0))
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (not deterministic, deterministic)
    trainer.configure_backends(TrainConfig(), torch.device("cpu"))  # nothing to set on CPU
    assert torch.backends.cudnn.deterministic is deterministic


class _Threads(Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> int:
        return cv2.getNumThreads()


def test_data_workers_run_opencv_single_threaded() -> None:
    loader = DataLoader(_Threads(), num_workers=1, worker_init_fn=trainer.data_worker_init)
    assert next(iter(loader)).item() == 1  # cv2.setNumThreads(0): OpenCV runs the calling thread only


def test_compile_mode_is_checked() -> None:
    assert TrainConfig(compile="default").compile == "default"
    with pytest.raises(ConfigError, match="train.compile"):
        TrainConfig(compile="reduce-overhead")  # CUDA graphs would replay FastDeconv's in-place statistics


def test_train_channels_last_puts_the_model_in_channels_last(synthetic_root: Path, tmp_path: Path) -> None:
    from tests.test_engine_trainer import CPU, tiny_cfg

    run = trainer.build_run(tiny_cfg(synthetic_root, "train.channels_last=true"), CPU, tmp_path)
    convs = [m.weight for m in run.model.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


@pytest.mark.slow  # the demo's whole model, forward and backward twice in float64 (one layer: test_nn_deconv)
def test_channels_last_model_and_gradients_match_the_default_layout(synthetic_root: Path, tmp_path: Path) -> None:
    from tests.test_engine_trainer import CPU, tiny_cfg

    run = trainer.build_run(tiny_cfg(synthetic_root, "train.channels_last=true"), CPU, tmp_path)
    convs = [m.weight for m in run.model.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    # The same step in both layouts (FastDeconv's patch sampling reads the actual strides), in float64: in
    # float32 the ASPP projection's whitening (its pooling branch is constant over space, so its covariance is
    # nearly singular) amplifies the layouts' different rounding to ~3% of the gradients below it with one
    # thread; in float64 the two agree to ~1e-13, and a real layout error would not shrink with the precision.
    run.model.double()
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    plain = copy.deepcopy(run.model).to(memory_format=torch.contiguous_format)
    x = torch.randn(2, 3, 32, 64, dtype=torch.float64)
    grads = []
    for model in (plain, run.model):
        for m in model.modules():  # no dropout: its random mask follows the memory layout and the thread count
            if isinstance(m, nn.Dropout):
                m.eval()
    for model, inp in ((plain, x), (run.model, x.contiguous(memory_format=torch.channels_last))):
        model(inp)["out"].square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert any(isinstance(m, FastDeconv) for m in plain.modules())
    total = torch.cat([g.flatten() for g in grads[0].values()]).norm()
    for name, g in grads[0].items():  # (the biases before a whitening layer get ~0: the mean removes them)
        assert (grads[1][name] - g).norm() <= 1e-9 * g.norm() + 1e-12 * total, name


@pytest.mark.slow  # inductor compiles the model on the CPU: a minute
def test_compiled_model_trains_as_eager_in_float64(synthetic_root: Path) -> None:
    """Three SGD steps of the demo's model (deconvolution everywhere, the stem's schedule, stats_every 4: the
    refresh and the rescaled steps) give the same weights and running statistics compiled as eager. Float64: the
    whitening of near-singular patch covariances amplifies float32 rounding, which compiled kernels reorder."""
    from tests.test_engine_trainer import tiny_cfg

    torch.manual_seed(0)
    model = build_model(tiny_cfg(synthetic_root).model).double().train()
    assert any(isinstance(m, FastDeconv) and m.stats_every == 4 for m in model.modules())
    inputs = [torch.randn(2, 3, 32, 64, dtype=torch.float64) for _ in range(3)]
    states, losses = [], []
    for compiled in (False, True):
        net = copy.deepcopy(model)
        step = torch.compile(net) if compiled else net
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        torch.manual_seed(1)
        run = []
        for x in inputs:  # (the ASPP's dropout draws the same masks compiled: torch's generator either way)
            optimizer.zero_grad()
            loss = step(x)["out"].square().mean()
            loss.backward()
            optimizer.step()
            run.append(loss.item())
        states.append(net.state_dict())
        losses.append(run)
    assert losses[1] == pytest.approx(losses[0], rel=1e-9)
    eager, compiled_state = states
    total = torch.cat([v.flatten() for v in eager.values() if v.is_floating_point()]).norm()
    for key, value in eager.items():
        assert torch.equal(compiled_state[key], value) or (
            value.is_floating_point() and (compiled_state[key] - value).norm() <= 1e-9 * total), key


@pytest.mark.slow  # inductor compiles the model on the CPU: minutes
def test_train_compile_runs_the_same_first_step(synthetic_root: Path, tmp_path: Path) -> None:
    """``train.compile: default`` trains through the engine; its first loss is eager's (same weights, same
    batch). Later steps are not compared in float32: see the float64 test above."""
    from tests.test_engine_trainer import CPU, _records, tiny_cfg

    first = {}
    for mode in ("none", "default"):
        cfg = tiny_cfg(synthetic_root, "train.iterations=2", f"train.compile={mode}")
        result = trainer.train(cfg, CPU, tmp_path / mode, show_progress=False)
        losses = [r["loss"] for r in _records(result.work_dir, "train")]
        assert len(losses) == 2 and all(map(math.isfinite, losses)), losses
        first[mode] = losses[0]
    assert first["default"] == pytest.approx(first["none"], rel=1e-5)
