"""Config files, base inheritance, overrides and their errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from seg.config import Config, ConfigError, dump_yaml, from_dict, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("**/*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert from_dict(to_dict(cfg)) == cfg


def test_benchmark_recipe() -> None:
    cfg = load_config(CONFIGS / "deeplab_deconv.yaml")
    m, t = cfg.model, cfg.train
    assert (m.arch, m.encoder, m.output_stride, m.norm, m.pretrained) == ("deeplabv3", "resnet50", 8, "deconv", None)
    assert m.deconv.keep_bn == ["*.downsample.1"] and m.num_classes == 19  # the paper's ND model, 19 classes
    assert (t.lr, t.momentum, t.weight_decay, t.poly_power, t.batch_size) == (0.1, 0.9, 1e-4, 0.9, 8)
    assert t.iterations == 30 * math.ceil(2975 / 8)
    assert (t.ignore_index, cfg.data.root) == (255, "datasets/cityscapes")
    assert (cfg.data.label_mapping, cfg.data.val_short_side, cfg.eval.reference_compat) == ("trainid", None, False)


@pytest.mark.parametrize(("name", "arch", "norm"), [("deeplabv3_resnet50_bn", "deeplabv3", "bn"),
                                                    ("deeplabv3_resnet50_deconv", "deeplabv3", "deconv"),
                                                    ("fcn_resnet50_bn", "fcn", "bn"),
                                                    ("fcn_resnet50_deconv", "fcn", "deconv")])
def test_paper_configs_are_the_reference_runs(name: str, arch: str, norm: str) -> None:
    cfg = load_config(CONFIGS / "paper" / f"{name}.yaml")
    m, d, t = cfg.model, cfg.data, cfg.train
    assert (m.arch, m.norm, m.encoder, m.output_stride, m.num_classes, m.aux_loss) == (arch, norm, "resnet50", 8, 21,
                                                                                        False)
    assert m.deconv.keep_bn == ["*.downsample.1"] and m.pretrained is None
    assert (d.short_side_range, d.scale_range, d.crop_size, d.pad_position) == ([260, 1040], [1.0, 1.0], [480, 480],
                                                                                  "top_left")
    assert (d.brightness, d.contrast, d.saturation, d.hue, d.hflip_prob) == (0, 0, 0, 0, 0.5)
    assert (d.val_short_side, d.label_mapping, cfg.eval.reference_compat) == (520, "reference", True)
    assert t.iterations == 30 * (2975 // 8) == 11130 and t.val_interval == 2975 // 8
    assert (t.amp, t.lr, t.momentum, t.weight_decay, t.poly_power, t.batch_size, t.warmup_iters) == (
        "none", 0.1, 0.9, 1e-4, 0.9, 8, 0)
    assert cfg.work_dir == f"checkpoints/paper/{name}"


def test_reference_labels_need_21_outputs() -> None:
    with pytest.raises(ConfigError, match=r"model.num_classes.*label_mapping.*21"):
        load_config(CONFIGS / "paper" / "fcn_resnet50_bn.yaml", ["model.num_classes=19"])


def test_base_inheritance_changes_only_what_it_names() -> None:
    base = to_dict(load_config(CONFIGS / "deeplab_deconv.yaml"))
    fcn_bn = to_dict(load_config(CONFIGS / "fcn_bn.yaml"))
    assert (fcn_bn["model"]["arch"], fcn_bn["model"]["norm"]) == ("fcn", "bn")
    fcn_bn["model"]["arch"], fcn_bn["model"]["norm"] = base["model"]["arch"], base["model"]["norm"]
    assert fcn_bn == base


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = load_config(
        CONFIGS / "demo.yaml",
        [
            "train.lr=0.5",
            "data.crop_size=[32,64]",
            "train.grad_clip=null",
            "model.encoder=resnet34",
            "model.deconv.block=8",
        ],
    )
    assert (cfg.train.lr, cfg.data.crop_size, cfg.train.grad_clip) == (0.5, [32, 64], None)
    assert (cfg.model.encoder, cfg.model.deconv.block) == ("resnet34", 8)
    assert isinstance(load_config(CONFIGS / "demo.yaml", ["train.lr=1"]).train.lr, float)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unknown_key_names_key_file_and_valid_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.yaml", "train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "train.learning_rate" in msg and str(path) in msg and "lr" in msg and "weight_decay" in msg


def test_unknown_key_in_base_names_the_base_file(tmp_path: Path) -> None:
    _write(tmp_path, "base.yaml", "model:\n  backbone: resnet50\n")
    child = _write(tmp_path, "child.yaml", "base: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml.*model\.backbone"):
        load_config(child)


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  lr: fast\n", "train.lr"),
        ("train:\n  iterations: 1.5\n", "train.iterations"),
        ("model:\n  aux_loss: 1\n", "model.aux_loss"),
        ("data:\n  crop_size: 512\n", "data.crop_size"),
        ("model: resnet\n", "model"),
        ("model:\n  norm: layernorm\n", "model.norm"),
        ("train:\n  batch_size: 0\n", "train.batch_size"),
        ("train:\n  val_interval: 0\n", "train.val_interval"),
        ("train:\n  grad_clip: -1\n", "train.grad_clip"),
        ("train:\n  momentum: 1.0\n", "train.momentum"),
        ("eval:\n  scales: []\n", "eval.scales"),
        ("eval:\n  stride: [0, 8]\n", "eval.stride"),
        ("data:\n  scale_range: [2.0, 1.0]\n", "data.scale_range"),
        ("data:\n  std: [0.2, 0.2]\n", "data.std"),
        ("model:\n  deconv:\n    eps: 0\n", "model.deconv.eps"),
        ("model:\n  deconv:\n    momentum: 1.5\n", "model.deconv.momentum"),
        ("task: detection\n", "task"),
    ],
)
def test_wrong_type_or_value_names_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    path = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert key in str(e.value) and str(path) in str(e.value)


def test_two_levels_of_base_are_rejected(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", "train:\n  lr: 0.1\n")
    _write(tmp_path, "b.yaml", "base: a.yaml\n")
    c = _write(tmp_path, "c.yaml", "base: b.yaml\n")
    with pytest.raises(ConfigError, match="one level"):
        load_config(c)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lrr=0.1", "train.lrr"),
        ("trian.lr=0.1", "trian"),
        ("train.lr", "KEY=VALUE"),
        ("train.lr=abc", "train.lr"),
        ("model.output_stride=4", "model.output_stride"),
        ("=3", "empty key"),
    ],
)
def test_bad_overrides(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "demo.yaml", [override])
    assert fragment in str(e.value)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_plain_data_survives_weights_only_load(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "deeplab_deconv.yaml")
    torch.save({"config": to_dict(cfg)}, tmp_path / "c.pth")
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)
    assert from_dict(loaded["config"]) == cfg
    assert load_config(_write(tmp_path, "dumped.yaml", dump_yaml(cfg))) == cfg


def test_sections_built_in_code_are_checked_too() -> None:
    from seg.config import TrainConfig

    with pytest.raises(ConfigError, match="train.iterations"):
        TrainConfig(iterations=0)
    assert TrainConfig(grad_clip=None, val_max_images=None).grad_clip is None  # null means "off", no range


def test_override_errors_name_the_file() -> None:
    with pytest.raises(ConfigError, match=r"demo\.yaml.*train\.batch_size"):
        load_config(CONFIGS / "demo.yaml", ["train.batch_size=0"])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.arch=resnet18"], "model.arch"),  # a classifier under task: segmentation
        (["data.dataset=cifar10"], "data.dataset"),
        (["task=classification"], "data.dataset"),  # classification on the Cityscapes layout
        (["train.loss=l2"], "train.loss"),  # the classification-only L2 loss under segmentation
        (["train.class_weights=[1.0, 2.0]"], "train.class_weights"),  # not one value per class
        (["train.ohem_thresh=0"], "train.ohem_thresh"),
        (["train.class_weights=[" + ", ".join(["1.0"] * 18) + ", 0.0]"], "train.class_weights"),
    ],
)
def test_task_decides_which_arch_and_dataset_fit(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(CONFIGS / "demo.yaml", overrides)


def test_a_program_that_never_imported_the_tasks_still_reads_configs(tmp_path: Path) -> None:
    """A library user reads a config (or a checkpoint's, through ``Predictor.from_checkpoint``) without importing
    ``seg.tasks`` first: the tasks are found on first use, and their rules still apply."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys\n"
        "from seg.config import ConfigError, load_config\n"
        "assert 'seg.tasks' not in sys.modules\n"
        f"cfg = load_config({str(root / 'configs' / 'demo.yaml')!r})\n"
        "assert cfg.task == 'segmentation' and 'seg.tasks' in sys.modules\n"
        "try:\n"
        "    load_config(sys.argv[1], ['model.arch=resnet18'])\n"
        "except ConfigError as e:\n"
        "    print('rejected:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(root / "configs" / "demo.yaml")], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "rejected:" in proc.stdout and "model.arch" in proc.stdout  # a classifier arch in a segmentation task
