"""seg.study and tools/study.py: study files, statistics against hand computations, aggregation of
hand-written metrics (resumed duplicates, a divergence; segmentation mIoU and classification top-1), and a tiny
real study (bn, deconv x 2 seeds)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from seg.checkpoint import load_checkpoint, save_checkpoint
from seg.config import ConfigError, load_config, to_dict
from seg.errors import UserError
from seg.study import (
    RunSpec,
    estimate,
    load_run,
    load_study,
    metric_for_task,
    paired_differences,
    plan_runs,
    plan_sweep_runs,
    run_study,
    select,
    study_task,
    summarize,
    t_quantile,
)
from seg.study.aggregate import latest_records, read_metrics
from seg.study.pipeline import write_results
from seg.study.report import markdown
from seg.study.runner import inspect_run, train_command
from seg.study.selection import extensions
from seg.study.stats import median, t_two_sided_mass
from tests.conftest import tiny_overrides
from tools import study as study_tool

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("miou_vs_iteration.png", "miou_vs_seconds.png", "loss_vs_iteration.png")


def tiny_opts(root: Path, iterations: int = 2) -> list[str]:
    """Seconds-long CPU runs on the session's synthetic set, validating every iteration."""
    return tiny_overrides(root, f"train.iterations={iterations}", "train.val_interval=1")


def write_study(path: Path, **changes: object) -> Path:
    data = {"name": "tiny", "base": "configs/demo.yaml", "seeds": [0, 1], "baseline": "bn",
            "variants": {"bn": ["model.norm=bn"], "deconv": ["model.norm=deconv"]}}
    data.update(changes)
    data = {k: v for k, v in data.items() if v is not None}
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize(("level", "dof", "expected"), [
    # Printed tables of Student's t (two-sided): 95% for 1, 2, 4, 10, 30, 100 dof; 99% for 5; 90% for 3.
    (0.95, 1, 12.7062), (0.95, 2, 4.3027), (0.95, 4, 2.7764), (0.95, 10, 2.2281), (0.95, 30, 2.0423),
    (0.95, 100, 1.9840), (0.99, 5, 4.0321), (0.90, 3, 2.3534),
])
def test_t_quantile_matches_the_table(level: float, dof: int, expected: float) -> None:
    assert t_quantile(level, dof) == pytest.approx(expected, abs=5e-5)
    assert t_two_sided_mass(t_quantile(level, dof), dof) == pytest.approx(level, abs=1e-12)


def test_t_mass_closed_forms() -> None:
    # 1 dof is the Cauchy distribution, 2 dof has P(|T| <= t) = t / sqrt(2 + t^2).
    for t in (0.3, 1.0, 5.0):
        assert t_two_sided_mass(t, 1) == pytest.approx(2 / math.pi * math.atan(t), abs=1e-14)
        assert t_two_sided_mass(t, 2) == pytest.approx(t / math.sqrt(2 + t * t), abs=1e-14)


def test_estimate_by_hand() -> None:
    e = estimate([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, std sqrt(10 / 4), half width t(0.975, 4) * std / sqrt(5) = 2.776445 * 1.581139 / 2.236068
    assert (e.n, e.mean) == (5, 3.0)
    assert e.std == pytest.approx(math.sqrt(2.5))
    assert e.ci == pytest.approx((3 - 1.963243, 3 + 1.963243), abs=1e-6)
    assert e.contains(1.5) and not e.contains(0.9)
    one = estimate([0.4])
    assert (one.mean, one.std, one.ci, one.contains(0.0)) == (0.4, None, None, None)
    assert estimate([]) is None


def test_paired_differences_use_common_seeds_only() -> None:
    d = paired_differences({0: 0.5, 1: 0.7, 2: 0.9}, {0: 0.4, 2: 0.6, 3: 0.1})
    assert d == pytest.approx({0: 0.1, 2: 0.3})
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([4.0, 1.0]) == 2.5 and median([]) is None


# --------------------------------------------------------------------------------------------
# aggregation of hand-written metrics.jsonl


def _val(it: int, miou: float, secs: float, acc: float = 0.8) -> dict:
    return {"event": "val", "iteration": it, "time": 0.0, "miou": miou, "acc": acc, "macc": 0.5, "iou": [miou],
            "train_seconds": secs}


def _train(it: int, loss: float, secs: float, mem: float = 1.0) -> dict:
    return {"event": "train", "iteration": it, "time": 0.0, "loss": loss, "lr": 0.1, "data_time": 0.01,
            "iter_time": 0.5, "train_seconds": secs, "peak_mem_gb": mem, "mem_kind": "cuda"}


def _write_run(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def hand_runs(tmp_path: Path) -> list:
    """bn seeds 0-2 and deconv seeds 0-2 over 20 iterations (val every 10); deconv seed 2 diverged, bn seed 1
    was resumed (iterations 11-20 logged twice: the second records count)."""
    finals = {"bn": [0.50, 0.52, 0.54], "deconv": [0.55, 0.58, None]}
    runs = []
    for variant, values in finals.items():
        for seed, final in enumerate(values):
            rows = [_train(10, 2.0, 10.0, mem=1.0 + seed), _val(10, 0.40 + 0.1 * (variant == "deconv"), 10.0)]
            if final is None:
                rows += [_train(15, 1.9, 15.0), {"event": "diverged", "iteration": 16, "message": "loss is nan"}]
            else:
                if variant == "bn" and seed == 1:  # first attempt of 11-20, then the resumed one
                    rows += [_train(20, 9.0, 99.0), _val(20, 0.01, 99.0)]
                rows += [_train(20, 1.5, 20.0 + seed), _val(20, final, 20.0 + seed, acc=0.9)]
            folder = _write_run(tmp_path / variant / f"seed{seed}", rows)
            runs.append(load_run(variant, seed, folder, 20))
    return runs


def test_latest_records_keep_the_last_per_iteration(hand_runs: list) -> None:
    bn1 = next(r for r in hand_runs if (r.variant, r.seed) == ("bn", 1))
    rows = read_metrics(Path(bn1.work_dir) / "metrics.jsonl")
    assert [r["miou"] for r in latest_records(rows, "val")] == [0.40, 0.52]
    assert bn1.final["miou"] == 0.52 and bn1.seconds_per_iteration == pytest.approx(21.0 / 20)


def test_read_metrics_drops_a_cut_last_line_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_val(1, 0.1, 1.0)) + "\n" + '{"event": "tra')
    assert len(read_metrics(path)) == 1
    path.write_text('{"event": "tra\n' + json.dumps(_val(1, 0.1, 1.0)) + "\n")
    with pytest.raises(Exception, match="metrics.jsonl:1"):
        read_metrics(path)


def test_summary_by_hand(hand_runs: list) -> None:
    s = summarize({"name": "hand", "seeds": [0, 1, 2], "opts": [], "base": "b.yaml", "command": "c"}, "bn",
                  {"bn": ["model.norm=bn"], "deconv": ["model.norm=deconv"]}, hand_runs)
    bn, dc = s["variants"]["bn"], s["variants"]["deconv"]
    t2, t1 = 4.302653, 12.706205
    assert bn["miou"]["mean"] == pytest.approx(0.52) and bn["miou"]["std"] == pytest.approx(0.02)
    assert bn["miou"]["ci95"] == pytest.approx([0.52 - t2 * 0.02 / math.sqrt(3), 0.52 + t2 * 0.02 / math.sqrt(3)])
    # The diverged seed is counted, not averaged: deconv over seeds 0 and 1.
    assert dc["counts"]["diverged"] == 1 and dc["counts"]["finished"] == 2
    assert dc["miou"]["n"] == 2 and dc["miou"]["mean"] == pytest.approx(0.565)
    # Paired: 0.55 - 0.50 = 0.05 and 0.58 - 0.52 = 0.06 -> mean 0.055, std 0.00707, half t(1) * 0.005.
    diff = dc["diff_to_baseline"]
    assert diff["seeds"] == [0, 1] and diff["mean"] == pytest.approx(0.055)
    assert diff["std"] == pytest.approx(math.sqrt(2) * 0.005)
    assert diff["ci95"] == pytest.approx([0.055 - t1 * 0.005, 0.055 + t1 * 0.005])
    assert diff["separated"] is False and bn["diff_to_baseline"] is None
    assert bn["acc_mean"] == pytest.approx(0.9)
    assert bn["seconds_per_iteration_median"] == pytest.approx(21.0 / 20)  # (20, 21, 22) / 20
    assert (bn["peak_mem_gb"], bn["mem_kind"]) == (3.0, "cuda")
    # Convergence: 90% of bn's mean 0.52 = 0.468; bn reaches it at 20, deconv (0.50 at 10) at 10.
    assert s["convergence_threshold"] == pytest.approx(0.468)
    assert [r["reached"] for r in bn["runs"]] == [{"iteration": 20, "train_seconds": 20.0 + k} for k in range(3)]
    assert [r["reached"] for r in dc["runs"]] == [{"iteration": 10, "train_seconds": 10.0}] * 3
    assert dc["runs"][2]["status"] == "diverged" and dc["runs"][2]["message"] == "loss is nan"
    text = markdown(s)
    assert "contain 0 for deconv" in text and "cannot be separated" in text and "s2: diverged" in text


def test_report_at_an_early_iteration_by_hand(hand_runs: list) -> None:
    """report_at: [10]: every seed validated at 10 (bn 0.40, deconv 0.50); deconv seed 2 diverged and is out."""
    s = summarize({"name": "hand", "seeds": [0, 1, 2], "opts": [], "base": "b.yaml", "command": "c"}, "bn",
                  {"bn": ["model.norm=bn"], "deconv": ["model.norm=deconv"]}, hand_runs, report_at=[10])
    at = s["at_iterations"]["10"]
    assert at["bn"]["miou"]["mean"] == pytest.approx(0.40) and at["bn"]["miou"]["n"] == 3
    assert at["deconv"]["miou"]["n"] == 2 and at["deconv"]["diff_to_baseline"]["seeds"] == [0, 1]
    assert at["deconv"]["diff_to_baseline"]["mean"] == pytest.approx(0.10)
    assert at["deconv"]["diff_to_baseline"]["std"] == pytest.approx(0.0, abs=1e-12)
    text = markdown(s)
    assert "## Val mIoU at iteration 10" in text and "| deconv | 50.00 ± 0.00 |" in text


def test_verdict_separates_and_one_seed_says_so(hand_runs: list) -> None:
    header = {"name": "hand", "seeds": [0, 1, 2], "opts": [], "base": "b.yaml", "command": "c"}
    shifted = [r for r in hand_runs if r.variant == "bn"]
    for r in hand_runs:
        if r.variant == "bn":
            fake = type(r)(**{**r.__dict__, "variant": "better", "val": [dict(v) for v in r.val]})
            for k, v in enumerate(fake.val):
                v["miou"] += 0.1 + 0.001 * k * r.seed
            shifted.append(fake)
    s = summarize(header, "bn", {"bn": [], "better": []}, shifted)
    assert s["variants"]["better"]["diff_to_baseline"]["separated"] is True
    assert "exclude 0 for better (higher" in markdown(s)
    one = summarize({**header, "seeds": [0]}, "bn", {"bn": [], "deconv": []},
                    [r for r in hand_runs if r.seed == 0])
    assert one["variants"]["deconv"]["diff_to_baseline"]["ci95"] is None
    assert "One seed per variant: no standard deviation and no intervals" in markdown(one)


# --------------------------------------------------------------------------------------------
# classification: the same report on top-1 / top-5


def _cls_val(it: int, top1: float, secs: float, top5: float = 0.95) -> dict:
    return {"event": "val", "iteration": it, "time": 0.0, "top1": top1, "top5": top5, "num_images": 10000,
            "train_seconds": secs}


@pytest.fixture
def cls_study(tmp_path: Path) -> dict:
    """studies/cifar10_resnet18.yaml (bn, deconv x seeds 0-2) at 20 iterations, its run folders hand-written
    like a classification run's metrics.jsonl: top-1 0.30 at 10 for all, finals bn 0.80/0.82/0.84 (top-5
    0.97/0.98/0.99), deconv 0.86/0.85 and seed 2 diverged; then the report written from the folders."""
    study = load_study(REPO / "studies" / "cifar10_resnet18.yaml")
    # The file's bn and deconv variants (it has more; two are enough for the report's arithmetic).
    study = dataclasses.replace(study, variants={k: study.variants[k] for k in ("bn", "deconv")})
    out = tmp_path / "out"
    specs = plan_runs(study, out, ["train.iterations=20"])
    finals = {"bn": [(0.80, 0.97), (0.82, 0.98), (0.84, 0.99)], "deconv": [(0.86, 0.99), (0.85, 0.99), None]}
    for spec in specs:
        final = finals[spec.variant][spec.seed]
        rows = [_train(10, 2.0, 10.0), _cls_val(10, 0.30, 10.0, top5=0.7)]
        if final is None:
            rows += [{"event": "diverged", "iteration": 12, "message": "loss is nan"}]
        else:
            rows += [_train(20, 1.0, 20.0 + spec.seed), _cls_val(20, final[0], 20.0 + spec.seed, top5=final[1])]
        _write_run(spec.work_dir, rows)
    result = write_results(study, out, specs, {})
    return {"study": study, "out": out, "specs": specs, "result": result}


def test_classification_study_reports_top1(cls_study: dict) -> None:
    out, s = cls_study["out"], cls_study["result"].summary
    assert s["task"] == "classification"
    assert s["metric"] == {"key": "top1", "label": "top-1", "secondary": "top5", "secondary_label": "top-5",
                           "extra": []}
    assert json.loads((out / "study.json").read_text()) == s
    bn, dc = s["variants"]["bn"], s["variants"]["deconv"]
    assert "miou" not in bn and "acc_mean" not in bn
    assert bn["top1"]["n"] == 3 and bn["top1"]["mean"] == pytest.approx(0.82)
    assert bn["top1"]["std"] == pytest.approx(0.02)
    assert bn["top5_mean"] == pytest.approx(0.98) and dc["top5_mean"] == pytest.approx(0.99)
    assert (dc["counts"]["finished"], dc["counts"]["diverged"]) == (2, 1) and dc["top1"]["mean"] == pytest.approx(0.855)
    # Paired on seeds 0 and 1: 0.86 - 0.80 = 0.06, 0.85 - 0.82 = 0.03.
    assert dc["diff_to_baseline"]["seeds"] == [0, 1] and dc["diff_to_baseline"]["mean"] == pytest.approx(0.045)
    run = bn["runs"][1]
    assert (run["final_top1"], run["final_top5"]) == (0.82, 0.98) and "final_miou" not in run
    assert run["seconds_per_iteration"] == pytest.approx(21.0 / 20)
    # Convergence on top-1: 90% of 0.82 = 0.738, reached at 20 by every finished run, never by the diverged one.
    assert s["convergence_threshold"] == pytest.approx(0.738)
    assert [r["reached"] for r in bn["runs"]] == [{"iteration": 20, "train_seconds": 20.0 + k} for k in range(3)]
    assert dc["runs"][2]["reached"] is None and dc["runs"][2]["status"] == "diverged"
    files = ("study.json", "study.md", "top1_vs_iteration.png", "top1_vs_seconds.png", "loss_vs_iteration.png")
    assert sorted(p.name for p in cls_study["result"].files) == sorted(files)
    for name in files:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob("miou*"))
    text = (out / "study.md").read_text()
    assert "## Final validation top-1" in text and "val top-1 % (mean ± std)" in text
    assert "Δ top-1 vs bn (paired)" in text and "| top-5 % |" in text and "![top1_vs_seconds.png]" in text
    assert "| 82.00 ± 2.00 |" in text and "| 98.00 |" in text and "whose top-1 is at least 90%" in text
    assert "(73.80%)" in text and "mIoU" not in text and "pixel acc" not in text
    header, rule = [line for line in text.splitlines() if line.startswith("| variant") or line.startswith("|---")]
    assert header.count("|") == rule.count("|") == 11


def test_a_study_compares_one_task(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path / "s.yaml"))
    specs = plan_runs(study, tmp_path / "out")
    assert study_task(study, specs) == "segmentation"
    assert metric_for_task("segmentation").finals == ("miou", "acc", "macc")
    cls_cfg = load_config(REPO / "configs" / "cifar10" / "resnet18_bn.yaml")
    mixed = [*specs, RunSpec("cls", 0, tmp_path / "out" / "cls" / "seed0", study.base, [], cls_cfg)]
    with pytest.raises(ConfigError, match=r"s\.yaml: the variants train different tasks \(bn: segmentation, "
                                          r"deconv: segmentation, cls: classification\)"):
        study_task(study, mixed)


def test_records_without_the_metric_are_one_clear_error(cls_study: dict) -> None:
    runs = cls_study["result"].runs
    with pytest.raises(UserError, match=r"metrics\.jsonl: the val record at iteration 10 has no 'miou' \(mIoU"):
        summarize({"name": "x", "seeds": [0, 1, 2]}, "bn", {"bn": [], "deconv": []}, runs)


# --------------------------------------------------------------------------------------------
# study files


@pytest.mark.parametrize(("changes", "names"), [
    ({"seeds": []}, ["'seeds'"]),
    ({"variants": {}}, ["'variants'"]),
    ({"baseline": "gn"}, ["'baseline'", "gn"]),
    ({"colour": "red"}, ["unknown key 'colour'"]),
    ({"variants": {"bn": ["model.norm"]}}, ["'variants.bn'", "model.norm"]),
    ({"opts": ["train.seed=3"]}, ["'opts'", "train.seed"]),
    ({"base": "configs/nope.yaml"}, ["'base'", "nope.yaml"]),
    ({"name": "../escape"}, ["'name'"]),
    ({"report_at": [0]}, ["'report_at'"]),
    ({"variants": {"bn": ["model.norm=bn"], "deconv": ["model.nrom=deconv"]}}, ["variant 'deconv'", "model.nrom"]),
    ({"variants": {"bn": ["model.norm=batchnorm"]}}, ["variant 'bn'", "batchnorm"]),
])
def test_bad_study_files_are_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture, changes: dict,
                                            names: list[str]) -> None:
    path = write_study(tmp_path / "bad.yaml", **changes)
    assert study_tool.main([str(path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert all(n in lines[0] for n in [str(path), *names]), lines[0]
    assert not (tmp_path / "out").exists()  # nothing started


def test_overrides_order_and_plan(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path / "s.yaml", opts=["train.lr=0.05"]))
    assert study.base == REPO / "configs" / "demo.yaml"
    specs = plan_runs(study, tmp_path / "out", ["train.iterations=7"])
    assert [(s.variant, s.seed) for s in specs] == [("bn", 0), ("bn", 1), ("deconv", 0), ("deconv", 1)]
    assert specs[3].overrides == ["train.lr=0.05", "model.norm=deconv", "train.iterations=7", "train.seed=1"]
    assert (specs[3].cfg.train.seed, specs[3].cfg.train.iterations, specs[3].cfg.model.norm) == (1, 7, "deconv")
    assert specs[3].work_dir == tmp_path / "out" / "deconv" / "seed1"
    cmd = train_command(specs[3], "cpu", resume=True)
    assert cmd[cmd.index("--work-dir") + 1] == str(specs[3].work_dir) and "--resume" in cmd
    assert cmd[cmd.index("--opts") + 1:] == specs[3].overrides
    with pytest.raises(ConfigError, match="train.seed"):
        plan_runs(study, tmp_path / "out", ["train.seed=4"])


def test_inspect_run_states(tmp_path: Path) -> None:
    spec = plan_runs(load_study(write_study(tmp_path / "s.yaml")), tmp_path / "out", ["train.iterations=5"])[0]
    assert inspect_run(spec) == "new"
    state = {"model": {}, "config": to_dict(spec.cfg), "iteration": 3}
    save_checkpoint(state, spec.work_dir / "last.pth")
    assert inspect_run(spec) == "resume"
    save_checkpoint({**state, "iteration": 5}, spec.work_dir / "last.pth")
    assert inspect_run(spec) == "done"
    save_checkpoint({**state, "config": {**state["config"], "train": {**state["config"]["train"], "lr": 0.5}}},
                    spec.work_dir / "last.pth")
    with pytest.raises(ConfigError, match="train.lr"):  # the folder holds another experiment
        inspect_run(spec)
    save_checkpoint(state, spec.work_dir / "last.pth")
    (spec.work_dir / "metrics.jsonl").write_text(json.dumps({"event": "diverged", "iteration": 4}) + "\n")
    assert inspect_run(spec) == "diverged"


# --------------------------------------------------------------------------------------------
# a real tiny study


@pytest.fixture(scope="module")
def tiny_study(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """bn and deconv x seeds 0, 1, two iterations each, two runs at a time."""
    d = tmp_path_factory.mktemp("study")
    study = load_study(write_study(d / "tiny.yaml"))
    lines: list[str] = []
    result = run_study(study, d / "out", tiny_opts(synthetic_root), device="cpu", jobs=2, log=lines.append)
    return {"study": study, "out": d / "out", "result": result, "log": lines, "opts": tiny_opts(synthetic_root)}


@pytest.mark.slow  # trains the tiny study's runs (module fixture)
def test_tiny_study_writes_its_files(tiny_study: dict) -> None:
    out, result = tiny_study["out"], tiny_study["result"]
    assert not result.failed and result.signum is None, [r.message for r in result.failed]
    for name in ("study.json", "study.md", *FIGURES):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "miou_vs_iteration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for variant in ("bn", "deconv"):
        for seed in (0, 1):
            assert "done: 2 iterations" in (out / variant / f"seed{seed}" / "train.log").read_text()
    assert any("OMP_NUM_THREADS" in line for line in tiny_study["log"])


@pytest.mark.slow  # trains the tiny study's runs (module fixture)
def test_tiny_study_numbers_come_from_the_runs(tiny_study: dict) -> None:
    out = tiny_study["out"]
    summary = json.loads((out / "study.json").read_text())
    finals = {}
    for variant, row in summary["variants"].items():
        assert row["counts"]["finished"] == 2
        for run in row["runs"]:
            rows = read_metrics(out / variant / f"seed{run['seed']}" / "metrics.jsonl")
            val = [r for r in rows if r["event"] == "val"][-1]
            train = [r for r in rows if r["event"] == "train"]
            assert val["iteration"] == 2
            assert (run["final_miou"], run["final_acc"], run["final_macc"]) == (val["miou"], val["acc"], val["macc"])
            assert run["seconds_per_iteration"] == pytest.approx(val["train_seconds"] / 2)
            assert run["peak_mem_gb"] == max(r["peak_mem_gb"] for r in train) and run["mem_kind"] == "rss"
            finals[variant, run["seed"]] = val["miou"]
        values = [finals[variant, s] for s in (0, 1)]
        assert row["miou"]["mean"] == pytest.approx(sum(values) / 2)
        assert row["miou"]["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    diffs = [finals["deconv", s] - finals["bn", s] for s in (0, 1)]
    assert summary["variants"]["deconv"]["diff_to_baseline"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert "deconv" in (out / "study.md").read_text()


@pytest.mark.slow  # trains the tiny study's runs (module fixture)
def test_second_call_skips_finished_runs(tiny_study: dict) -> None:
    out = tiny_study["out"]
    before = {p: p.read_text() for p in out.glob("*/seed*/metrics.jsonl")}
    lines: list[str] = []
    t0 = time.time()
    result = run_study(tiny_study["study"], out, tiny_study["opts"], device="cpu", jobs=2, log=lines.append)
    assert not result.failed
    assert sum(line.startswith("skip") for line in lines) == 4 and not any("start" in line for line in lines)
    assert {p: p.read_text() for p in before} == before  # no new records
    assert time.time() - t0 < 60


def _env() -> dict[str, str]:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow  # a train.py subprocess
def test_a_failing_run_is_recorded_and_the_study_exits_1(tmp_path: Path, synthetic_root: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    # The config is valid, the data root is not there: train.py fails (exit 2) with no 'diverged' record.
    path = write_study(tmp_path / "s.yaml", seeds=[0], variants={"bn": ["model.norm=bn"]})
    argv = [str(path), "--out", str(tmp_path / "out"), "--device", "cpu", "--opts",
            *tiny_opts(tmp_path / "nowhere")]
    assert study_tool.main(argv) == 1
    assert "bn/seed0 (failed)" in capsys.readouterr().err
    run = json.loads((tmp_path / "out" / "study.json").read_text())["variants"]["bn"]["runs"][0]
    assert run["status"] == "failed" and "nowhere" in run["message"] and "exit code 2" in run["message"]


@pytest.mark.slow  # a subprocess per case; `pytest -m slow` runs it
def test_ctrl_c_stops_the_children_cleanly(tmp_path: Path, synthetic_root: Path) -> None:
    # Two seeds, one job: seed1 is still pending when the stop comes, and must never start.
    path = write_study(tmp_path / "s.yaml", seeds=[0, 1], variants={"bn": ["model.norm=bn"]})
    run_dir = tmp_path / "out" / "bn" / "seed0"
    cmd = [sys.executable, "tools/study.py", str(path), "--out", str(tmp_path / "out"), "--device", "cpu",
           "--opts", *tiny_opts(synthetic_root, iterations=100000)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not any(
                r["event"] == "train" for r in read_metrics(run_dir / "metrics.jsonl")):
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, out + err
    assert "interrupted bn/seed0" in out and "Traceback" not in err
    assert "stopped by SIGINT" in (run_dir / "train.log").read_text() and (run_dir / "last.pth").is_file()
    summary = json.loads((tmp_path / "out" / "study.json").read_text())
    assert [r["status"] for r in summary["variants"]["bn"]["runs"]] == ["interrupted", "incomplete"]
    assert not (tmp_path / "out" / "bn" / "seed1").exists()


# --------------------------------------------------------------------------------------------
# sweeps: a value per variant picked on selection seeds, then the reported seeds at the pick

SWEEP = {"key": "train.lr", "values": [0.01, 0.1], "seeds": [7], "rule": "best_mean_final",
         "opts": ["train.iterations=1"]}


@pytest.mark.parametrize(("sweep", "names"), [
    ({**SWEEP, "seeds": [0, 7]}, ["'sweep.seeds'", "shares seeds [0]"]),
    ({**SWEEP, "rule": "best_guess"}, ["'sweep.rule'", "best_guess", "best_mean_final"]),
    ({**SWEEP, "key": "train.seed"}, ["'sweep.key'"]),
    ({**SWEEP, "values": []}, ["'sweep.values'"]),
    ({**SWEEP, "values": [0.1, 0.1]}, ["'sweep.values'", "repeats"]),
    ({**SWEEP, "values": {"bn": [0.1]}}, ["'sweep.values'", "deconv"]),
    ({**SWEEP, "step": 2}, ["'sweep.step'"]),
    ({k: v for k, v in SWEEP.items() if k != "rule"}, ["'sweep.rule'", "missing"]),
    ({**SWEEP, "key": "train.lrr"}, ["train.lrr"]),
    ({**SWEEP, "values": ["fast"]}, ["train.lr", "fast"]),
])
def test_bad_sweeps_are_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture, sweep: dict,
                                       names: list[str]) -> None:
    path = write_study(tmp_path / "bad.yaml", sweep=sweep)
    assert study_tool.main([str(path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert all(n in lines[0] for n in [str(path), *names]), lines[0]
    assert not (tmp_path / "out").exists()


def test_a_variant_may_not_set_the_swept_key(tmp_path: Path) -> None:
    path = write_study(tmp_path / "s.yaml", sweep=SWEEP, variants={"bn": ["model.norm=bn", "train.lr=0.5"]})
    with pytest.raises(ConfigError, match=r"variants.bn.*train.lr"):
        load_study(path)
    study = load_study(write_study(tmp_path / "ok.yaml", sweep=SWEEP))
    with pytest.raises(ConfigError, match="swept key"):
        plan_runs(study, tmp_path / "out", ["train.lr=0.3"])


def test_sweep_plan_layout_and_overrides(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path / "s.yaml", sweep={**SWEEP, "values": {"bn": [0.01, 0.1],
                                                                                  "deconv": [0.3]}}))
    specs = plan_sweep_runs(study, tmp_path / "out", ["train.iterations=5"])
    assert [(s.label, s.value) for s in specs] == [("bn/lr_0.01/seed7", 0.01), ("bn/lr_0.1/seed7", 0.1),
                                                   ("deconv/lr_0.3/seed7", 0.3)]
    assert specs[1].work_dir == tmp_path / "out" / "bn" / "sweep" / "lr_0.1" / "seed7"
    assert specs[1].overrides == ["model.norm=bn", "train.lr=0.1", "train.iterations=1", "train.iterations=5",
                                  "train.seed=7"]
    assert (specs[1].cfg.train.lr, specs[1].cfg.train.seed) == (0.1, 7)
    assert plan_runs(study, tmp_path / "out") == []  # the reported runs wait for their picks
    reported = plan_runs(study, tmp_path / "out", picks={"deconv": 0.3})
    demo_iterations = load_config(REPO / "configs" / "demo.yaml").train.iterations  # selection opts do not apply
    assert [(s.label, s.cfg.train.lr, s.cfg.train.iterations) for s in reported] == [
        ("deconv/seed0", 0.3, demo_iterations), ("deconv/seed1", 0.3, demo_iterations)]


def _selection_run(out: Path, variant: str, value: float, seed: int, miou: float | None) -> None:
    rows = [_val(1, miou, 1.0)] if miou is not None else [{"event": "diverged", "iteration": 1, "message": "nan"}]
    _write_run(out / variant / "sweep" / f"lr_{value}" / f"seed{seed}", rows)


def test_selection_rule_by_hand(tmp_path: Path) -> None:
    """best_mean_final: mean over selection seeds, diverged = 0, ties to the first value; edges flagged."""
    sweep = {**SWEEP, "values": [0.01, 0.1, 1.0], "seeds": [7, 8]}
    study = load_study(write_study(tmp_path / "s.yaml", sweep=sweep))
    out = tmp_path / "out"
    scores = {("bn", 0.01): (0.30, 0.20), ("bn", 0.1): (0.40, 0.30), ("bn", 1.0): (0.90, None),
              ("deconv", 0.01): (0.50, 0.50), ("deconv", 0.1): (0.60, 0.40), ("deconv", 1.0): (None, None)}
    for (variant, value), pair in scores.items():
        for seed, miou in zip((7, 8), pair, strict=True):
            _selection_run(out, variant, value, seed, miou)
    specs = plan_sweep_runs(study, out, ["train.iterations=1"])
    selection = select(study, specs, [load_run(s.variant, s.seed, s.work_dir, 1) for s in specs], "miou")
    bn, deconv = selection["variants"]["bn"], selection["variants"]["deconv"]
    assert [r["mean"] for r in bn["values"]] == pytest.approx([0.25, 0.35, 0.45])  # 1.0: (0.9 + 0) / 2
    assert bn["picked"] == 1.0 and bn["at_edge"]
    assert [r["mean"] for r in deconv["values"]] == pytest.approx([0.5, 0.5, 0.0])
    assert deconv["picked"] == 0.01 and deconv["at_edge"]  # a tie goes to the value listed first
    assert deconv["values"][2]["statuses"] == ["diverged", "diverged"]
    (out / "deconv" / "sweep" / "lr_0.1" / "seed8" / "metrics.jsonl").unlink()
    selection = select(study, specs, [load_run(s.variant, s.seed, s.work_dir, 1) for s in specs], "miou")
    assert selection["variants"]["deconv"]["picked"] is None
    assert "0.1" in selection["variants"]["deconv"]["why_none"]


@pytest.fixture(scope="module")
def tiny_sweep(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """bn, lr in {0.01, 0.1} on selection seed 7 (1 iteration), then seed 0 at the pick (3 runs: the sweep
    logic per variant is tested by hand above; this one checks that real runs go through it)."""
    d = tmp_path_factory.mktemp("sweep")
    study = load_study(write_study(d / "tiny.yaml", sweep=SWEEP, opts=["train.iterations=2"], seeds=[0],
                                   variants={"bn": ["model.norm=bn"]}))
    lines: list[str] = []
    opts = [o for o in tiny_opts(synthetic_root) if not o.startswith("train.iterations")]
    result = run_study(study, d / "out", opts, device="cpu", jobs=2, log=lines.append)
    return {"study": study, "out": d / "out", "result": result, "log": lines, "opts": opts}


@pytest.mark.slow  # trains the tiny sweep's runs (module fixture)
def test_tiny_sweep_picks_then_reports(tiny_sweep: dict) -> None:
    out, result = tiny_sweep["out"], tiny_sweep["result"]
    assert not result.failed and result.signum is None, [r.message for r in result.failed]
    summary = json.loads((out / "study.json").read_text())
    sel = summary["sweep"]
    for variant in ("bn",):
        rows = sel["variants"][variant]["values"]
        finals = []
        for row in rows:
            recs = read_metrics(out / variant / "sweep" / f"lr_{row['value']}" / "seed7" / "metrics.jsonl")
            val = [r for r in recs if r["event"] == "val"][-1]
            assert val["iteration"] == 1 and row["scores"] == [val["miou"]]
            finals.append(val["miou"])
        picked = sel["variants"][variant]["picked"]
        assert picked == rows[finals.index(max(finals))]["value"]
        assert f"picked train.lr={picked} for {variant} (best_mean_final)" in tiny_sweep["log"]
        for seed in (0,):  # the reported run: its own seed, at the pick, the study's iterations (not 1)
            ckpt = load_checkpoint(out / variant / f"seed{seed}" / "last.pth")
            assert ckpt["config"]["train"]["lr"] == picked and ckpt["config"]["train"]["seed"] == seed
            assert ckpt["iteration"] == 2
        assert summary["variants"][variant]["counts"]["finished"] == 1
    assert [r.seed for r in result.runs] == [0] and [r.seed for r in result.selection_runs] == [7, 7]
    md = (out / "study.md").read_text()
    assert "Selection of `train.lr`" in md and "best_mean_final" in md and "miou_vs_lr.png" in md
    assert (out / "miou_vs_lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in FIGURES:  # the equal-iterations and equal-seconds views stay
        assert (out / name).is_file()


@pytest.mark.slow  # trains the tiny sweep's runs (module fixture)
def test_tiny_sweep_second_call_skips_everything(tiny_sweep: dict) -> None:
    lines: list[str] = []
    result = run_study(tiny_sweep["study"], tiny_sweep["out"], tiny_sweep["opts"], device="cpu", jobs=2,
                       log=lines.append)
    assert not result.failed
    assert sum(line.startswith("skip") for line in lines) == 3 and not any("start" in line for line in lines)
    assert any(line.startswith("skip bn/lr_0.01/seed7") for line in lines)


@pytest.mark.slow  # trains a selection run in a subprocess
def test_a_failing_selection_run_stops_that_variant_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture
                                                                ) -> None:
    path = write_study(tmp_path / "s.yaml", seeds=[0], variants={"bn": ["model.norm=bn"]},
                       sweep={**SWEEP, "values": [0.1]})
    argv = [str(path), "--out", str(tmp_path / "out"), "--device", "cpu", "--opts",
            *tiny_opts(tmp_path / "nowhere")]
    assert study_tool.main(argv) == 1
    assert "bn/sweep/lr_0.1/seed7 (failed)" in capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "study.json").read_text())
    assert summary["sweep"]["variants"]["bn"]["picked"] is None
    assert summary["variants"]["bn"]["runs"] == [] and not (tmp_path / "out" / "bn" / "seed0").exists()
    md = (tmp_path / "out" / "study.md").read_text()
    assert "No pick yet for bn" in md and "lies inside" not in md


def test_extension_adds_the_next_value_at_an_end(tmp_path: Path) -> None:
    """extend: 1: bn's pick 1.0 (the top end) adds 10.0, deconv's pick 0.01 adds 0.001; a pick inside adds none;
    a second extension at the same end is not made."""
    sweep = {**SWEEP, "values": [0.01, 0.1, 1.0], "extend": 1}
    study = load_study(write_study(tmp_path / "s.yaml", sweep=sweep,
                                   variants={"bn": ["model.norm=bn"], "deconv": ["model.norm=deconv"],
                                             "gn": ["model.norm=gn"]}))
    out = tmp_path / "out"
    scores = {"bn": (0.1, 0.2, 0.3), "deconv": (0.3, 0.2, 0.1), "gn": (0.1, 0.3, 0.2)}
    for variant, row in scores.items():
        for value, miou in zip((0.01, 0.1, 1.0), row, strict=True):
            _selection_run(out, variant, value, 7, miou)
    values = {v: list(vals) for v, vals in study.sweep.values.items()}
    specs = plan_sweep_runs(study, out, ["train.iterations=1"], values)
    selection = select(study, specs, [load_run(s.variant, s.seed, s.work_dir, 1) for s in specs], "miou", values)
    assert extensions(study, selection, values) == {"bn": 10.0, "deconv": 0.001}
    values["bn"].append(10.0)
    values["deconv"].append(0.001)
    _selection_run(out, "bn", 10.0, 7, 0.5)  # still best at the new end: no further value (extend: 1)
    _selection_run(out, "deconv", 0.001, 7, None)  # diverged: 0.01 stays the pick, now inside
    specs = plan_sweep_runs(study, out, ["train.iterations=1"], values)
    selection = select(study, specs, [load_run(s.variant, s.seed, s.work_dir, 1) for s in specs], "miou", values)
    assert extensions(study, selection, values) == {}
    bn, deconv = selection["variants"]["bn"], selection["variants"]["deconv"]
    assert (bn["picked"], bn["at_edge"], bn["added"]) == (10.0, True, [10.0])
    assert [r["value"] for r in deconv["values"]] == [0.001, 0.01, 0.1, 1.0]
    assert (deconv["picked"], deconv["at_edge"]) == (0.01, False)
    with pytest.raises(ConfigError, match="sweep.extend"):
        load_study(write_study(tmp_path / "bad.yaml", sweep={**SWEEP, "values": ["a", "b"], "extend": 1}))
