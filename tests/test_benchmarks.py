"""The whole-model benchmark runs end to end on a tiny setting (every table, the sweep's files) and rejects bad
options by name. (The prepared GPU check: tests/test_gpu_check.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "train_step.py"
SWEEP = BENCHMARKS / "train_sweep.py"
GPU_CHECK = BENCHMARKS / "gpu_check.sh"


def run(*args: str, script: Path = SCRIPT) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow  # whole DeepLabV3 models, every norm and a profiled breakdown: the slowest test
def test_train_step_prints_ratios_norms_variants_and_breakdown():
    proc = run("--encoder", "resnet18", "--arch", "fcn", "--os", "16", "--size", "64", "128", "--batch", "2",
               "--repeats", "1", "--warmup", "0", "--no-memory", "--variant", "stats_every=2,matrix_grad=false",
               "--breakdown", "--norm", "deconv", "gn", "none")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    main = next(line for line in lines if line.startswith("| fcn resnet18 | 16 | ") and line.count("|") == 17)
    assert float(main.split("|")[5].strip().rstrip("x")) > 0  # the deconv/BN training ratio
    # Operations of one step: more with deconvolution than with BN, and no host sync in either.
    ops_bn, ops_deconv, ratio, syncs = (c.strip() for c in main.split("|")[13:17])
    assert int(ops_deconv) > int(ops_bn) > 0 and ratio.endswith("x") and syncs == "0 / 0"
    # One row per norm, bn (the baseline, timed though not named) first, each with its ratios to bn.
    norms = [line.split("|") for line in lines if line.startswith("| fcn resnet18 | 16 | ") and line.count("|") == 10]
    assert [cells[3].strip() for cells in norms] == ["bn", "deconv", "gn", "none"]
    assert all(cells[5].strip() == "1.00x" and cells[7].strip() == "1.00x" for cells in norms[:1])
    assert all(float(cells[5].strip().rstrip("x")) > 0 and cells[7].strip().endswith("x") for cells in norms)
    variant = next(line for line in lines if "| stats_every=2,matrix_grad=false |" in line)
    assert variant.split("|")[5].strip().endswith("x")
    parts = next(line for line in lines if line.startswith("| fcn resnet18 | 16 | ") and "%" in line)
    cells = [c.strip() for c in parts.split("|")[1:-1]]
    # step BN, step deconv, extra, then the parts and the rest, which add up to the extra
    extra = float(cells[4])
    shares = [float(c.split()[0]) for c in cells[5:]]
    assert abs(sum(shares) - extra) < 2e-3 * max(1.0, len(shares))
    assert shares[0] > 0 and shares[2] > 0  # the fold and the inverse square root were seen by the profiler


@pytest.mark.slow  # a profiled layer benchmark in a subprocess
def test_deconv_layer_writes_ratios_spread_and_a_breakdown_that_adds_up(tmp_path: Path) -> None:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    out = tmp_path / "layer"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "deconv_layer.py"), "--layers", "3x3 64->64",
                           "1x1 256->1024", "--batch", "1", "--size", "12", "16", "--repeats", "2", "--breakdown",
                           "--output", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["layer"] for r in data["rows"]] == ["3x3 64->64", "1x1 256->1024"]
    for row in data["rows"]:
        assert len(row["samples"]["dc_train"]) == 2
        assert row["train_ratio_min"] <= row["train_ratio"] <= row["train_ratio_max"]
        deconv, bn = row["breakdown"]["deconv"], row["breakdown"]["bn"]
        # The profiler saw every part of deconvolution, and the parts with the rest make up the step.
        assert all(deconv[p] > 0 for p in ("conv", "sampling + covariance", "inverse sqrt", "fold W·D"))
        assert bn["BatchNorm"] > 0 and "BatchNorm" not in deconv
        for parts in (deconv, bn):
            assert abs(sum(v for k, v in parts.items() if k != "step") - parts["step"]) < 1e-9
    table = out.with_suffix(".md").read_text()
    assert "| 3x3 64->64 |" in table and "| 1x1 256->1024 | deconv |" in table and "torch=" in table


@pytest.mark.slow  # a subprocess per case; `pytest -m slow` runs it
def test_train_step_rejects_unknown_variant_keys():
    proc = run("--variant", "stats_every=2,bogus=1")
    assert proc.returncode == 2
    assert "model.deconv.bogus" in proc.stderr


@pytest.mark.slow  # a subprocess per case; `pytest -m slow` runs it
def test_train_step_rejects_unknown_norms_and_a_breakdown_without_deconv():
    proc = run("--norm", "gn", "layernorm")
    assert proc.returncode == 2 and "--norm" in proc.stderr and "layernorm" in proc.stderr
    proc = run("--norm", "gn", "--breakdown")
    assert proc.returncode == 2 and "add deconv to --norm" in proc.stderr


# -- train_sweep.py (and its older spelling train_step.py --sweep) -----------------------------------------


@pytest.mark.slow  # a sweep of whole models in a subprocess
def test_sweep_writes_table_json_and_plot(tmp_path: Path) -> None:
    proc = run("--sizes", "2x32x64", "1x32x64", "--max-pixels", "3000", "--archs", "fcn",
               "--output-strides", "16", "--encoder", "resnet18", "--norm", "bn", "deconv", "--repeats", "2",
               "--warmup", "0", "--no-memory", "--threads", "1", "--out-dir", str(tmp_path), "--name", "tiny",
               script=SWEEP)
    # (one thread: no OpenMP spinning against whatever else the machine runs)
    assert proc.returncode == 0, proc.stderr
    files = {ext: tmp_path / f"tiny.{ext}" for ext in ("md", "json", "png")}
    assert all(f.is_file() for f in files.values())
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads(files["json"].read_text())
    meta, points = data["meta"], data["points"]
    assert meta["repeats"] == 2 and meta["torch"].startswith(torch.__version__) and meta["machine"] and meta["date"]
    # The smaller workload first; the one above --max-pixels did not fit and says why.
    assert [(p["batch"], p["height"], p["width"], p["fit"]) for p in points] == [(1, 32, 64, True), (2, 32, 64, False)]
    assert "--max-pixels 3000" in points[1]["reason"] and points[1]["norms"] == {}
    norms = points[0]["norms"]
    assert list(norms) == ["bn", "deconv", "deconv folded"]
    assert norms["bn"]["train_ratio"] == 1.0 and norms["bn"]["eval_ratio"] == 1.0
    deconv = norms["deconv"]
    assert len(deconv["train_samples"]) == 2 and deconv["train_ratio"] > 0
    assert deconv["train_ratio_min"] <= deconv["train_ratio_max"]
    assert "train_s" not in norms["deconv folded"] and norms["deconv folded"]["eval_ratio"] > 0

    md = files["md"].read_text()
    for text in (meta["date"], meta["machine"], f"torch {meta['torch']}", "2 repetitions after 0 warm-up",
                 "![ratio to BN against pixels per step](tiny.png)", "## Training step: ratio to BN by workload",
                 "| fcn resnet18 | 16 | deconv | ", "did not fit: 4096 pixels per step > --max-pixels 3000"):
        assert text in md
    assert "tiny.md" in proc.stdout  # where it wrote


def _benchmark_module(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        module = __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_sweep_options_are_checked(capsys: pytest.CaptureFixture) -> None:
    parse_args = _benchmark_module("train_sweep").parse_args
    for argv, message in ((["--sizes", "2x32"], "BATCHxHEIGHTxWIDTH"),
                          (["--breakdown"], "unrecognized arguments: --breakdown"),  # train_step.py's alone
                          (["--encoder", "resnet5O"], "--encoder"),
                          (["--max-pixels", "0"], "--max-pixels must be positive")):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as exc:  # the sweep's options belong to train_sweep.py
        _benchmark_module("train_step").parse_args(["--sizes", "2x32x64"])
    assert exc.value.code == 2 and "unrecognized arguments: --sizes" in capsys.readouterr().err
    args = parse_args(["--archs", "fcn", "--output-strides", "16"])[0]
    assert args.arch == ["fcn"] and args.os == [16] and args.name == "train_step_sweep_cpu"
    assert [f"{b}x{h}x{w}" for b, h, w in args.sizes] == train_step_defaults()


@pytest.mark.parametrize("module, flag", [("train_sweep", []), ("train_step", ["--sweep"])])
def test_sweep_check_args_in_both_spellings(module: str, flag: list[str], capsys: pytest.CaptureFixture) -> None:
    # --check-args: the exact flags of the GPU check, validated without a device; nothing written. In process:
    # the GPU check's dry run (tests/test_gpu_check.py) runs the script as a command.
    _benchmark_module(module).main([*flag, "--device", "cuda", "--archs", "deeplabv3", "--output-strides", "8",
                                    "--check-args", "--sizes", "8x512x1024", "8x480x480", "--name", "n",
                                    "--out-dir", "/nonexistent/d"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["sizes"] == ["8x480x480", "8x512x1024"] and plan["arch"] == ["deeplabv3"] and plan["os"] == [8]
    assert plan["writes"][0] == "/nonexistent/d/n.md"


def train_step_defaults() -> list[str]:
    return ["2x256x512", "4x256x512", "4x480x480", "8x480x480", "8x512x1024"]


def test_memory_guard_extrapolates_the_last_workload() -> None:
    sweep = _benchmark_module("train_sweep")
    last = {"pixels": 1000, "norms": {"bn": {"peak_mib": 1500.0, "step_mib": 1000.0},
                                      "deconv": {"peak_mib": 1800.0, "step_mib": 900.0},
                                      "deconv folded": {"eval_s": 0.1}}}
    assert sweep.predicted_peak_mib(last, 4000) == 500 + 4000  # bn: the larger at 4x the pixels
    cpu = torch.device("cpu")
    args = sweep.parse_args(["--max-memory-gib", "4"])[0]
    assert sweep.memory_guard(args, cpu, 3000, last) is None  # 3.4 GiB
    assert "predicted peak RSS 4.4 GiB" in sweep.memory_guard(args, cpu, 4000, last)
    assert sweep.memory_guard(args, torch.device("cuda"), 4000, last) is None  # CUDA: out of memory is caught
    args.max_pixels = 2000
    assert "--max-pixels 2000" in sweep.memory_guard(args, cpu, 3000, None)


def test_deconv_model_keeps_the_configs_shortcut_batchnorm_unless_told() -> None:
    """The benchmarks time the deconvolution model users train: configs/deeplab_deconv.yaml's keep_bn (BatchNorm
    after each 1×1 shortcut conv), read from that file; ``--keep-bn`` with no pattern: a model without BN."""
    from seg.config import load_config

    train_step = _benchmark_module("train_step")
    keep = load_config(train_step.BENCHMARK_CONFIG).model.deconv.keep_bn
    assert keep and train_step.parse_args([])[0].keep_bn == keep
    assert train_step.parse_args(["--keep-bn"])[0].keep_bn == []
    assert _benchmark_module("train_sweep").parse_args([])[0].keep_bn == keep

    def batchnorms(keep_bn: list[str]) -> list[str]:
        model = train_step.make_model("fcn", "resnet18", 16, "deconv", "auto", torch.device("cpu"), keep_bn=keep_bn)
        return [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    assert batchnorms(keep) == [f"encoder.layer{i}.0.downsample.1" for i in (2, 3, 4)]  # ResNet-18's shortcuts
    assert batchnorms([]) == []


def test_versions_plans_every_workload_smallest_size_first(capsys: pytest.CaptureFixture) -> None:
    versions = _benchmark_module("versions")
    repo = str(BENCHMARKS.parent)
    with pytest.raises(SystemExit) as exc:
        versions.main(["--prev", repo, "--models", "deeplabv3:9"])
    assert exc.value.code == 2 and "ARCH:OS" in capsys.readouterr().err
    versions.main(["--prev", repo, "--layers", "3x3 64->64", "stem 7x7/2 3->64", "--layer-size", "2", "8", "8",
                   "--models", "deeplabv3:8", "fcn:16", "--model-sizes", "2x64x64", "1x32x32", "--check-args"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["workloads"] == ["3x3 64->64 on 2×8×8×C", "stem 7x7/2 3->64 on 2×8×8×C",
                                 "deeplabv3-R50 OS 8, 2×3×64×64", "fcn-R50 OS 16, 2×3×64×64",
                                 "deeplabv3-R50 OS 8, 1×3×32×32", "fcn-R50 OS 16, 1×3×32×32"]


@pytest.mark.slow  # two whole ResNet-50 models per version
def test_versions_against_this_checkout_itself(tmp_path: Path) -> None:
    # --prev is this checkout: "old" and "new" are the same code, so they count the same operations.
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "versions.py"), "--prev", str(BENCHMARKS.parent),
                           "--layers", "3x3 64->64", "--layer-size", "2", "8", "8", "--models", "fcn:16",
                           "--model-sizes", "2x32x32", "--repeats", "1", "--warmup", "0",
                           "--output", str(tmp_path / "v")], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "v.json").read_text())["workloads"]
    assert list(result) == ["3x3 64->64 on 2×8×8×C", "fcn-R50 OS 16, 2×3×32×32"]
    for r in result.values():
        assert r["counts"]["deconv old"] == r["counts"]["deconv new"] and r["new_over_old"] > 0
    assert "| fcn-R50 OS 16, 2×3×32×32 |" in (tmp_path / "v.md").read_text()
