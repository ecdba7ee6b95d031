"""tools/demo.py end to end at a tiny size: the steps it announces, input | ground truth | prediction per val
image, the IoU table file, every printed path existing, and a second call reusing the finished run."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seg.media import read_image_rgb
from seg.visualize import GAP, TITLE_HEIGHT, colorize
from tools import demo


@pytest.mark.slow  # trains, evaluates and runs tools/infer.py on the video in a subprocess
def test_demo_end_to_end_tiny(synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    opts = [f"data.root={synthetic_root}", "data.crop_size=[32,64]", "data.num_workers=0", "model.deconv.block=8",
            "train.batch_size=2", "train.iterations=2", "train.val_interval=2", "train.checkpoint_interval=2",
            "train.log_interval=1"]
    work = tmp_path / "demo"
    assert demo.main(["--work-dir", str(work), "--opts", *opts]) == 0
    out = capsys.readouterr().out
    steps = re.findall(r"\[demo (\d)/6\]", out)
    assert steps[:4] == ["2", "3", "4", "5"], out
    compares = sorted((work / "masks").glob("*_compare.png"))
    val_images = sorted((synthetic_root / "leftImg8bit" / "val").rglob("*.png"))
    assert len(compares) == min(demo.NUM_MASKS, len(val_images)) > 0
    image = read_image_rgb(val_images[0])
    h, w = image.shape[:2]
    row = read_image_rgb(compares[0])
    assert row.shape == (h + TITLE_HEIGHT, 3 * w + 2 * GAP, 3)
    # The middle panel is the ground truth in the trainId palette (the labelTrainIds file colored as it is).
    stem = compares[0].name[: -len("_compare.png")]
    label_file = next((synthetic_root / "gtFine" / "val").rglob(f"{stem}_gtFine_labelTrainIds.png"))
    truth = colorize(np.asarray(Image.open(label_file)))
    assert np.array_equal(row[TITLE_HEIGHT:, w + GAP: 2 * w + GAP], truth)
    table = (work / "val_iou.txt").read_text()
    assert "road" in table and "mIoU" in table
    for label in ("checkpoint:", "IoU table:", "run folder:"):  # every path it names exists
        line = next(line for line in out.splitlines() if line.startswith(label))
        assert Path(line[len(label):].split()[0]).exists(), line
    assert demo.main(["--work-dir", str(work), "--opts", *opts]) == 0
    assert "reusing the finished run" in capsys.readouterr().out


def test_demo_bad_override_is_one_error_line(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert demo.main(["--work-dir", str(tmp_path / "d"), "--opts", "train.iterationz=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "train.iterationz" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()
