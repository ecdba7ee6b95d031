"""benchmarks/cifar_step.py (the CIFAR Table 1 networks, BN vs ND per training step) runs end to end in-process on
a tiny setting, builds the reference's models (parameter counts generated from the reference) and rejects an
unknown network in one line."""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE_PARAMS = REPO / "tests" / "data" / "cifar_zoo_reference_params.csv"


@pytest.fixture
def cifar_step() -> Iterator:
    """The script as a module; torch's thread count (main sets it) restored afterwards."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    threads = torch.get_num_threads()
    try:
        import cifar_step

        yield cifar_step
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
        torch.set_num_threads(threads)


def reference_params() -> dict[tuple[str, str], int]:
    with open(REFERENCE_PARAMS, newline="") as f:
        return {(r["arch"], r["norm"]): int(r["params"]) for r in csv.DictReader(f)}


def test_table_has_a_row_per_network_with_the_reference_models_and_finite_ratios(cifar_step, capsys, tmp_path):
    # The two cheapest networks of the table at batch 2 (ND's cost is mostly per layer, not per sample).
    archs = ["efficientnet_b0", "mobilenetv2"]
    out = tmp_path / "table.md"
    code = cifar_step.main(["--arch", *archs, "--batch", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
                            "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    lines = printed.splitlines()
    header = lines.index(cifar_step.HEADER.splitlines()[0])
    rows = [line.split("|")[1:-1] for line in lines[header + 2:] if line.startswith("| ")]
    assert [r[0].strip() for r in rows] == archs
    reference = reference_params()
    for cells in rows:
        arch, params_bn, params_nd, bn, nd, ratio = (c.strip() for c in cells)
        # BN is the reference's --deconv False model, ND its --deconv True --block-fc 512 model.
        assert int(params_bn.replace(",", "")) == reference[(arch, "bn")]
        assert int(params_nd.replace(",", "")) == reference[(arch, "deconv")]
        value = float(ratio.split("x")[0])
        assert math.isfinite(value) and value > 0 and float(bn) > 0 and float(nd) > 0
        # the ratio is ND over BN (up to the 3 decimals printed)
        assert value == pytest.approx(float(nd) / float(bn), rel=0.05, abs=0.02)
    for text in ("- machine: ", f"- torch {torch.__version__}", "1 threads", "load average (1 min) at start",
                 "Load average (1 min) at end", "batch 2×3×32×32"):
        assert text in printed, text
    assert printed == out.read_text() + f"wrote {out}\n"  # --out holds exactly the markdown printed


def test_an_unknown_network_is_a_one_line_error(cifar_step, capsys):
    assert cifar_step.main(["--arch", "resnet18", "vgg17"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: --arch vgg17: not a Table 1 network")
