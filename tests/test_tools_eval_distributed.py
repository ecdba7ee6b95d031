"""tools/eval.py under torchrun gives the single-process numbers (uneven shards, nothing counted twice)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from seg.config import Config, DataConfig, to_dict
from tests.conftest import save_untrained_checkpoint, tiny_model_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_eval_matches_single_process(synthetic_root, tmp_path):
    cfg = Config(model=tiny_model_cfg(), data=DataConfig(root=str(synthetic_root), num_workers=0))
    ckpt = save_untrained_checkpoint(tmp_path / "last.pth", cfg)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1")
    # 4 training images on 3 processes: shards of 2, 1 and 1 images.
    common = [str(config), str(ckpt), "--split", "train", "--device", "cpu"]
    single = [sys.executable, str(ROOT / "tools/eval.py"), *common, "--out", str(tmp_path / "one")]
    multi = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=3",
        str(ROOT / "tools/eval.py"),
        *common,
        "--out",
        str(tmp_path / "three"),
    ]
    for cmd in (single, multi):
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=600, capture_output=True)
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    three = json.loads((tmp_path / "three" / "metrics.json").read_text())
    assert three["metrics"]["num_images"] == one["metrics"]["num_images"] == 4
    assert three["confusion_matrix"] == one["confusion_matrix"]
