"""Typed configuration: YAML files (one level of ``base:``) mapped onto dataclasses, CLI overrides.

Unknown keys and wrong types are errors that name the key, the file and what is valid.
``to_dict``/``from_dict`` give plain data, safe for ``torch.load(weights_only=True)`` checkpoints.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the source."""


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"key '{key}' has value {value!r}, expected one of {', '.join(map(str, choices))}")


@dataclass
class DeconvConfig:
    """Settings of network deconvolution (``norm: deconv``); defaults are the reference's."""

    block: int = 64
    sampling_stride: int = 3
    n_iter: int = 5
    eps: float = 1e-5
    momentum: float = 0.1
    # The layer that sees the RGB image: more iterations (its covariance is ill-conditioned) and
    # statistics refreshed only periodically, as in the reference.
    stem_n_iter: int = 15
    stem_freeze: bool = True
    stem_freeze_iter: int = 100
    # Cross-process statistics; training turns it on by itself when the world size is above 1.
    sync: bool = False
    # Deconvolve the final 1x1 classifier too (the reference heads do).
    classifier: bool = True
    # Speed option that changes the mathematics (1 = off, the reference operator): every non-stem layer
    # computes its whitening matrix only every k training steps; in between it keeps the matrix, rescaled
    # to the batch's mean variance, with the batch's mean (see benchmarks/README.md for cost and mIoU).
    stats_every: int = 1
    # Speed option that changes the mathematics (true = the reference): false treats every non-stem layer's
    # whitening matrix as a constant in the backward pass (the mean keeps its gradient).
    matrix_grad: bool = True

    def __post_init__(self) -> None:
        for key in ("block", "sampling_stride", "n_iter", "stem_n_iter", "stem_freeze_iter", "stats_every"):
            value = getattr(self, key)
            if value < 1:
                raise ConfigError(f"key 'model.deconv.{key}' must be >= 1, got {value}")


@dataclass
class ModelConfig:
    arch: str = "deeplabv3"  # deeplabv3 | deeplabv3plus | fcn
    encoder: str = "resnet50"  # any smp encoder name, e.g. resnet18, resnet101, tu-resnet50d
    output_stride: int = 8  # 8 | 16
    norm: str = "deconv"  # deconv | bn
    deconv: DeconvConfig = field(default_factory=DeconvConfig)
    aux_loss: bool = False  # auxiliary FCN head on the stride-16 stage
    num_classes: int = 19
    pretrained: str | None = None  # local file of encoder or model weights; nothing is downloaded

    def __post_init__(self) -> None:
        _check_choice("model.arch", self.arch, ("deeplabv3", "deeplabv3plus", "fcn"))
        _check_choice("model.output_stride", self.output_stride, (8, 16))
        _check_choice("model.norm", self.norm, ("deconv", "bn"))
        if self.num_classes < 1:
            raise ConfigError(f"key 'model.num_classes' must be >= 1, got {self.num_classes}")


@dataclass
class DataConfig:
    root: str = "datasets/cityscapes"
    train_split: str = "train"
    val_split: str = "val"
    crop_size: list[int] = field(default_factory=lambda: [512, 1024])  # H, W
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    hflip_prob: float = 0.5
    # Photometric jitter strengths (0 disables each).
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.25
    hue: float = 0.0
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    num_workers: int = 4

    def __post_init__(self) -> None:
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise ConfigError(f"key 'data.crop_size' must be [height, width] > 0, got {self.crop_size}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ConfigError(f"key 'data.scale_range' needs [min, max], 0 < min <= max: {self.scale_range}")
        if not 0 <= self.hflip_prob <= 1:
            raise ConfigError(f"key 'data.hflip_prob' must be in [0, 1], got {self.hflip_prob}")
        for key in ("brightness", "contrast", "saturation"):
            if getattr(self, key) < 0:
                raise ConfigError(f"key 'data.{key}' must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.hue <= 0.5:
            raise ConfigError(f"key 'data.hue' must be in [0, 0.5], got {self.hue}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"keys 'data.mean'/'data.std' need 3 values, std > 0: {self.mean}, {self.std}")
        if self.num_workers < 0:
            raise ConfigError(f"key 'data.num_workers' must be >= 0, got {self.num_workers}")


@dataclass
class TrainConfig:
    batch_size: int = 8  # per process
    iterations: int = 11160  # 30 epochs of 2975 images at batch 8
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    warmup_iters: int = 0
    warmup_ratio: float = 0.1
    aux_weight: float = 0.4
    grad_clip: float | None = None
    amp: str = "auto"  # auto (bf16 on CUDA if supported, else fp16; off on CPU) | bf16 | fp16 | none
    ignore_index: int = 255
    seed: int = 0
    log_interval: int = 20
    val_interval: int = 1000
    checkpoint_interval: int = 500
    val_max_images: int | None = None  # validate on a subset (None: the whole split)

    def __post_init__(self) -> None:
        _check_choice("train.amp", self.amp, ("auto", "bf16", "fp16", "none"))


@dataclass
class EvalConfig:
    mode: str = "whole"  # whole | slide
    crop_size: list[int] = field(default_factory=lambda: [1024, 1024])
    stride: list[int] = field(default_factory=lambda: [768, 768])
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    batch_size: int = 1
    # Reference-compatible scoring (NOT the benchmark metric): 21 outputs with void as class 0,
    # IoU averaged over all 21, images resized to short side 520.
    reference_compat: bool = False

    def __post_init__(self) -> None:
        _check_choice("eval.mode", self.mode, ("whole", "slide"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    work_dir: str | None = None  # default: work_dirs/<config file stem>


# --------------------------------------------------------------------------------------------
# dict <-> dataclass with validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (ints to floats, lists)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{source}: key '{key}' has value {value!r}, expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' must be a mapping of {sorted(_fields(tp))}, got {value!r}")
        return _from_dict(tp, value, source, prefix=key + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: key '{key}' has value {value!r}, expected a list")
        return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: key '{key}' has value {value!r}, expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: key '{key}' has value {value!r}, expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' has value {value!r}, expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: key '{key}' has value {value!r}, expected a string")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for '{key}'")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _from_dict(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    fields = _fields(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}'; valid keys of "
            f"'{prefix.rstrip('.') or 'top level'}': {', '.join(sorted(fields))}"
        )
    kwargs = {k: _convert(v, fields[k], prefix + k, source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Build a validated :class:`Config` from plain data (e.g. the copy stored in a checkpoint)."""
    return _from_dict(Config, data, source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict/list/str/number data of a config (or config section)."""
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------
# files and overrides


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (['a', 'b'], value parsed as YAML, so numbers, lists and null work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. train.lr=0.05")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML: {e}") from e
    return key.split("."), value


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (with its ``base:`` file, at most one level) and apply ``KEY=VALUE`` overrides."""
    path = Path(path)
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: key 'base' must be a file name, got {base!r}")
        base_path = (path.parent / base).resolve()
        base_data = _read_yaml(base_path)
        if "base" in base_data:
            raise ConfigError(f"{base_path}: 'base' files cannot have a base of their own (one level only)")
        cfg = from_dict(base_data, str(base_path))  # validates the base file on its own terms
        data = _merge(to_dict(cfg), data)
    cfg = from_dict(data, str(path))
    for text in overrides or []:
        keys, value = parse_override(text)
        merged = to_dict(cfg)
        node = merged
        for i, k in enumerate(keys[:-1]):
            if not isinstance(node.get(k), dict):
                valid = ", ".join(sorted(node)) if isinstance(node, dict) else ""
                raise ConfigError(f"override '{text}': unknown section '{'.'.join(keys[: i + 1])}'; valid: {valid}")
            node = node[k]
        if keys[-1] not in node:
            raise ConfigError(
                f"override '{text}': unknown key '{'.'.join(keys)}'; valid keys: {', '.join(sorted(node))}"
            )
        node[keys[-1]] = value
        cfg = from_dict(merged, f"override '{text}'")
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
