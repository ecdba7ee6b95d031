"""Expected failures of eval/infer/export/prepare_cityscapes/make_synthetic_cityscapes: the documented exit
code and one `error:` line naming the file or key, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from seg.config import Config, DataConfig, to_dict
from seg.evaluation.official import OfficialEvalError, core_name, ground_truth_files
from tests.conftest import save_untrained_checkpoint, tiny_model_cfg
from tools import eval as eval_tool
from tools import export as export_tool
from tools import infer as infer_tool
from tools import make_synthetic_cityscapes as synth_tool
from tools import prepare_cityscapes as prepare_tool
from tools import study as study_tool
from tools import train as train_tool

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(synthetic_root, tmp_path_factory) -> dict[str, Path]:
    """A valid config and checkpoint, a config with a missing data root, a non-checkpoint and a broken image."""
    d = tmp_path_factory.mktemp("tool_errors")
    save_untrained_checkpoint(d / "last.pth", Config(model=tiny_model_cfg()))
    (d / "ok.yaml").write_text(yaml.safe_dump(to_dict(Config(data=DataConfig(root=str(synthetic_root))))))
    (d / "noroot.yaml").write_text(yaml.safe_dump(to_dict(Config(data=DataConfig(root=str(d / "no_data"))))))
    (d / "notes.pth").write_text("these are notes, not a checkpoint")
    (d / "broken.png").write_bytes(b"not a png")
    return {"dir": d, "config": d / "ok.yaml", "noroot": d / "noroot.yaml", "ckpt": d / "last.pth"}


def call(main, argv: list[str]) -> int:
    """A tool's exit code, whether main returns it or exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def one_error_line(err: str, *names: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


CASES = {
    # tool: [(argv builder, expected exit code, names the error line must contain)]
    "eval": [
        (lambda f: [f["config"], f["dir"] / "missing.pth"], 2, ["missing.pth"]),
        (lambda f: [f["config"], f["dir"] / "notes.pth"], 2, ["notes.pth"]),
        (lambda f: [f["noroot"], f["ckpt"]], 2, ["no_data"]),
        (lambda f: [f["config"], f["ckpt"], "--opts", "data.nope=1"], 2, ["data.nope"]),
        (lambda f: [f["dir"] / "nothere.yaml", f["ckpt"]], 2, ["nothere.yaml"]),
    ],
    "infer": [
        (lambda f: [f["config"], f["dir"] / "missing.pth", f["dir"] / "broken.png"], 2, ["missing.pth"]),
        (lambda f: [f["config"], f["dir"] / "notes.pth", f["dir"] / "broken.png"], 2, ["notes.pth"]),
        (lambda f: [f["config"], f["ckpt"], f["dir"] / "broken.png", "--opts", "eval.nope=1"], 2, ["eval.nope"]),
        (lambda f: [f["config"], f["ckpt"], f["dir"] / "broken.png", "--out", f["dir"] / "o"], 1, ["broken.png"]),
        (lambda f: [f["config"], f["ckpt"], f["dir"] / "nothing.png", "--out", f["dir"] / "o"], 1, ["nothing.png"]),
    ],
    "export": [
        (lambda f: [f["config"], f["dir"] / "missing.pth", "--format", "torchscript"], 2, ["missing.pth"]),
        (lambda f: [f["config"], f["dir"] / "notes.pth", "--format", "torchscript"], 2, ["notes.pth"]),
        (lambda f: [f["dir"] / "nothere.yaml", f["ckpt"], "--format", "torchscript"], 2, ["nothere.yaml"]),
    ],
    "train": [
        (lambda f: [f["dir"] / "nothere.yaml", "--device", "cpu"], 2, ["nothere.yaml"]),
        (lambda f: [f["noroot"], "--device", "cpu", "--work-dir", f["dir"] / "run"], 2, ["no_data"]),
        (lambda f: [f["config"], "--device", "cpu", "--opts", "train.nope=1"], 2, ["train.nope"]),
    ],
    "study": [
        (lambda f: [f["dir"] / "nothere.yaml", "--device", "cpu"], 2, ["nothere.yaml"]),
        (lambda f: [f["dir"] / "nothere.yaml", "--jobs", "0"], 2, ["--jobs"]),
    ],
    "prepare_cityscapes": [
        (lambda f: ["--root", f["dir"] / "no_data", "--nproc", "1"], 2, ["no_data"]),
    ],
    "make_synthetic_cityscapes": [
        (lambda f: ["--root", f["dir"] / "s", "--height", "4096"], 2, ["4096"]),
        (lambda f: ["--root", f["dir"] / "notes.pth", "--train", "1", "--val", "0", "--test", "0"], 2, ["notes.pth"]),
    ],
}
MAINS = {
    "eval": eval_tool.main,
    "train": train_tool.main,
    "study": study_tool.main,
    "infer": infer_tool.main,
    "export": export_tool.main,
    "prepare_cityscapes": prepare_tool.main,
    "make_synthetic_cityscapes": synth_tool.main,
}


@pytest.mark.parametrize(
    "tool,case", [(tool, i) for tool, cases in CASES.items() for i in range(len(cases))], ids=str
)
def test_expected_failures_in_process(tool, case, files, capsys):
    argv_of, code, names = CASES[tool][case]
    argv = [str(a) for a in argv_of(files)]
    assert call(MAINS[tool], argv) == code
    one_error_line(capsys.readouterr().err, *names)


# One tool as a real process in the fast tier (interpreter start-up is most of the cost: ~3 s each); the
# others in the slow tier. Every case of every tool also runs in-process above.
@pytest.mark.parametrize("tool", [t if i == 0 else pytest.param(t, marks=pytest.mark.slow)
                                  for i, t in enumerate(CASES)])
def test_expected_failure_as_a_process(tool, files):
    """The first case of each tool as a real process: exit status and stderr as a user sees them."""
    argv_of, code, names = CASES[tool][0]
    cmd = [sys.executable, str(ROOT / "tools" / f"{tool}.py"), *(str(a) for a in argv_of(files))]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr
    one_error_line(proc.stderr, *names)


def test_infer_without_cuda_is_a_clear_error(files, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    argv = [str(files["config"]), str(files["ckpt"]), str(files["dir"] / "broken.png"), "--device", "cuda"]
    assert infer_tool.main(argv) == 2
    one_error_line(capsys.readouterr().err, "cuda")


def test_eval_reports_an_unreadable_image_of_the_dataset(synthetic_root, files, tmp_path, capsys):
    """A broken image read in a DataLoader worker is still one line naming the file."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "leftImg8bit" / "val", root / "leftImg8bit" / "val")
    shutil.copytree(synthetic_root / "gtFine" / "val", root / "gtFine" / "val")
    image = sorted((root / "leftImg8bit" / "val").glob("*/*.png"))[0]
    image.write_bytes(b"truncated")
    cfg = Config(data=DataConfig(root=str(root), num_workers=1))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    code = call(eval_tool.main, [str(tmp_path / "c.yaml"), str(files["ckpt"]), "--out", str(tmp_path / "out")])
    assert code == 2
    one_error_line(capsys.readouterr().err, image.name)


def test_official_bridge_errors_are_user_errors(tmp_path):
    with pytest.raises(OfficialEvalError, match="not a Cityscapes file name"):
        core_name(tmp_path / "holiday.png")
    with pytest.raises(OfficialEvalError, match="gtFine"):
        ground_truth_files(tmp_path, "val")
    assert core_name("aachen_000000_000019_leftImg8bit.png") == "aachen_000000_000019"
