"""tools/train.py as a user runs it: torchrun with two gloo processes, SIGTERM, config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seg.checkpoint import load_checkpoint
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def tiny_opts(root: Path, *extra: str) -> list[str]:
    return ["--opts", *tiny_overrides(root, "train.batch_size=1", "train.iterations=3", *extra)]


TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def train_cmd(work_dir: Path, root: Path, *extra: str, launcher: list[str] | None = None) -> list[str]:
    """tools/train.py on the demo config with tiny settings, optionally under a torchrun launcher."""
    prefix = launcher or [sys.executable]
    return [*prefix, "tools/train.py", "configs/demo.yaml", "--device", "cpu", "--no-progress",
            "--work-dir", str(work_dir), *tiny_opts(root, *extra)]


def _env() -> dict[str, str]:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _records(work_dir: Path, event: str) -> list[dict]:
    path = work_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


@pytest.mark.slow  # torchrun with two processes
def test_two_process_torchrun_ends_with_identical_weights(synthetic_root: Path, tmp_path: Path) -> None:
    cmd = train_cmd(tmp_path, synthetic_root, launcher=TORCHRUN_2)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 per process x 2 processes = 2 effective" in proc.stdout
    final = _records(tmp_path, "final")
    assert len(final) == 1 and len(final[0]["fingerprints"]) == 2
    assert final[0]["fingerprints"][0] == final[0]["fingerprints"][1]
    ckpt = load_checkpoint(tmp_path / "last.pth")
    # Equal fingerprints include the deconvolution running statistics, which differ unless synced.
    assert ckpt["iteration"] == 3
    assert len(ckpt["rng"]) == 2  # each rank's random streams, for an exact resume
    assert [v["iteration"] for v in _records(tmp_path, "val")] == [3]


@pytest.mark.slow  # a training subprocess killed with SIGTERM
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(synthetic_root: Path, tmp_path: Path) -> None:
    cmd = train_cmd(tmp_path, synthetic_root, "train.iterations=100000")
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not _records(tmp_path, "train") and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:] + err[-2000:]
    assert "Traceback" not in err and "stopped by SIGTERM" in out
    ckpt = load_checkpoint(tmp_path / "last.pth")
    assert 1 <= ckpt["iteration"] < 100000


def test_config_error_exits_2_naming_the_key(capsys: pytest.CaptureFixture) -> None:
    # Every kind of config error is covered by tests/test_config.py; this checks the tool's exit path (in process:
    # the exit code as a process gives it is tests/test_tools_errors.py's test_expected_failure_as_a_process).
    assert _train_tool(["configs/demo.yaml", "--opts", "train.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "train.lrr" in err and "Traceback" not in err


def test_missing_dataset_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["configs/demo.yaml", "--device", "cpu", "--work-dir", str(tmp_path / "run"),
            "--opts", f"data.root={tmp_path / 'nowhere'}"]
    assert _train_tool(argv) == 2  # a user error
    err = capsys.readouterr().err
    assert "make demo" in err and "nowhere" in err and "Traceback" not in err


def _train_workers(pid: int) -> list[int]:
    """Child processes of ``pid`` running tools/train.py (torchrun's workers)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if b"train.py" in Path(f"/proc/{p}/cmdline").read_bytes()]


@pytest.mark.slow
def test_torchrun_restarts_a_dead_worker_and_resumes(synthetic_root: Path, tmp_path: Path) -> None:
    cmd = train_cmd(tmp_path, synthetic_root, "train.iterations=12", "train.checkpoint_interval=1",
                    launcher=[*TORCHRUN_2, "--max-restarts=1"])
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "last.pth").is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        workers = _train_workers(proc.pid)
        assert proc.poll() is None and workers, "training ended before a worker could be killed"
        os.kill(workers[-1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out
    assert load_checkpoint(tmp_path / "last.pth")["iteration"] == 12


def _train_tool(argv: list[str]) -> int:
    from tools import train as train_tool

    try:
        return train_tool.main(argv)
    except SystemExit as e:  # a single process leaves through sys.exit
        return int(e.code or 0)


def _one_error_line(err: str, *names: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert all(name in lines[0] for name in names), (names, lines[0])


@pytest.mark.parametrize("override", ["train.batch_size=0", "train.val_interval=0", "eval.scales=[]"])
def test_out_of_range_values_exit_2_naming_key_and_file(override: str, capsys: pytest.CaptureFixture) -> None:
    assert _train_tool(["configs/demo.yaml", "--device", "cpu", "--opts", override]) == 2
    _one_error_line(capsys.readouterr().err, override.split("=")[0], "configs/demo.yaml")


def test_corrupt_training_image_is_one_error_line(
    synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    victim = sorted((root / "leftImg8bit" / "train").rglob("*.png"))[1]
    victim.write_bytes(b"\x89PNG truncated")
    # A worker process reads it: the error crosses the DataLoader and still reads as one line.
    argv = ["configs/demo.yaml", "--device", "cpu", "--no-progress", "--work-dir", str(tmp_path / "run"),
            *tiny_opts(root, "train.batch_size=2", "train.iterations=2", "data.num_workers=1")]
    assert _train_tool(argv) == 2  # unreadable data: a user error
    _one_error_line(capsys.readouterr().err, victim.name)
