"""Typed configuration: YAML files (one level of ``base:``) mapped onto dataclasses, CLI overrides.

Unknown keys and wrong types are errors that name the key, the file and what is valid.
``to_dict``/``from_dict`` give plain data, safe for ``torch.load(weights_only=True)`` checkpoints.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seg.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the key and the source."""


# task name -> the task's own config rules (which model.arch, data.dataset, train.loss it takes; raise
# ConfigError). The config knows no task by name: each task in seg/tasks/ registers itself when the package
# seg.tasks is imported (seg.tasks.register_task). A program that reads a config before anything imported
# seg.tasks (e.g. a library user's Predictor.from_checkpoint) gets them discovered on first use.
TASK_RULES: dict[str, Callable[[Config], None]] = {}
# The package whose import registers the tasks: named here, imported by name at run time (plugin discovery,
# as entry points are), never by an import statement: seg.config stays below seg.tasks in the layers.
TASKS_PACKAGE = "seg.tasks"


def register_task_rules(name: str, check: Callable[[Config], None]) -> None:
    """Make ``task: <name>`` valid, with ``check(cfg)`` run on every config of that task."""
    TASK_RULES[name] = check


def checked_field(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = dataclasses.MISSING,
    choices: tuple | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    length: int | None = None,
) -> Any:
    """A config field with its checks: a choice, bounds (on the value or on every list item), a list length.

    The checks are data on the field, run by :meth:`_Section.__post_init__` for every section, so each
    rule is written once, next to the field it guards.
    """
    rules = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "length": length}
    metadata = {k: v for k, v in rules.items() if v is not None}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _check_value(key: str, value: Any, rules: typing.Mapping[str, Any]) -> None:
    if value is None:  # optional fields: None means "off" and has no range
        return
    if "choices" in rules and value not in rules["choices"]:
        raise ConfigError(f"key '{key}' has value {value!r}, expected one of {', '.join(map(str, rules['choices']))}")
    if "length" in rules and len(value) != rules["length"]:
        raise ConfigError(f"key '{key}' has value {value!r}, expected a list of {rules['length']} values")
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not items and rules:
        # A list with rules (a length, bounds on its values) needs values; one without may be empty.
        raise ConfigError(f"key '{key}' is an empty list, expected at least one value")
    bounds = (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b))
    for name, sign, ok in bounds:
        if name in rules and not all(ok(v, rules[name]) for v in items):
            what = "every value" if isinstance(value, list) else "a value"
            raise ConfigError(f"key '{key}' has value {value!r}, expected {what} {sign} {rules[name]}")


class _Section:
    """Base of the config sections: checks every field's rules (see :func:`checked_field`) on construction."""

    _key: typing.ClassVar[str] = ""  # where the section sits in a config file, e.g. "model.deconv"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            _check_value(f"{self._key}.{f.name}".lstrip("."), getattr(self, f.name), f.metadata)
        self.check()

    def check(self) -> None:
        """Rules that involve several fields; a section overrides it when it has any."""


@dataclass
class DeconvConfig(_Section):
    """Settings of network deconvolution (``norm: deconv``); defaults are the reference's."""

    _key = "model.deconv"
    block: int = checked_field(64, ge=1)
    sampling_stride: int = checked_field(3, ge=1)
    n_iter: int = checked_field(5, ge=1)
    eps: float = checked_field(1e-5, gt=0)
    momentum: float = checked_field(0.1, gt=0, le=1)
    # The layer that sees the RGB image: more iterations (its covariance is ill-conditioned) and
    # statistics refreshed only periodically, as in the reference.
    stem_n_iter: int = checked_field(15, ge=1)
    stem_freeze: bool = True
    stem_freeze_iter: int = checked_field(100, ge=1)
    # Cross-process statistics; build_model turns it on by itself when the world size is above 1.
    sync: bool = False
    # Deconvolve the final 1x1 classifier too (the reference heads do).
    classifier: bool = True
    # Speed option that changes the mathematics (1 = off, the reference operator): every non-stem layer
    # computes its whitening matrix only every k training steps; in between it keeps the matrix, rescaled
    # to the batch's mean variance, with the batch's mean (see benchmarks/README.md for cost and mIoU).
    stats_every: int = checked_field(1, ge=1)
    # Speed option that changes the mathematics (true = the reference): false treats every non-stem layer's
    # whitening matrix as a constant in the backward pass (the mean keeps its gradient).
    matrix_grad: bool = True
    # ND++ (Ye et al.'s follow-up): normalise each deconvolution layer's input per sample before its
    # statistics, in training and eval. none = the original operator.
    norm_type: str = checked_field("none", choices=("none", "layernorm", "l1norm"))
    # BatchNorm layers to keep (shell-style patterns of module names, e.g. "*.downsample.1"): the reference's
    # ImageNet ResNets keep a BatchNorm after each shortcut conv. Empty: every BatchNorm is removed.
    keep_bn: list[str] = checked_field(factory=list)


@dataclass
class IterNormConfig(_Section):
    """Batch whitening (``norm: iternorm``; Huang et al., Iterative Normalization, CVPR 2019)."""

    _key = "model.iternorm"
    num_channels: int = checked_field(64, ge=1)  # channels per whitened group (halved until it divides C)
    T: int = checked_field(5, ge=1)  # Newton iterations
    eps: float = checked_field(1e-5, gt=0)
    momentum: float = checked_field(0.1, gt=0, le=1)


@dataclass
class ChannelDeconvConfig(_Section):
    """Channel-only whitening in place of every BatchNorm (``norm: channel_deconv``; the reference's
    ``ChannelDeconv``): the ablation without ND's spatial decorrelation."""

    _key = "model.channel_deconv"
    block: int = checked_field(64, ge=1)
    eps: float = checked_field(1e-2, gt=0)
    n_iter: int = checked_field(5, ge=1)
    momentum: float = checked_field(0.1, gt=0, le=1)
    sampling_stride: int = checked_field(3, ge=1)


@dataclass
class ModelConfig(_Section):
    _key = "model"
    # The network; which names a task takes is the task's rule (seg/tasks/<task>.py, e.g. deeplabv3 for
    # segmentation, resnet18 or tv:resnet50 for classification).
    arch: str = "deeplabv3"
    encoder: str = "resnet50"  # any smp encoder name, e.g. resnet18, resnet101, tu-resnet50d
    output_stride: int = checked_field(8, choices=(8, 16))
    # What replaces normalisation in the whole model (encoder and heads): deconv (network deconvolution in
    # every conv), bn (BatchNorm; SyncBatchNorm under torchrun on CUDA), gn (GroupNorm), iternorm (batch
    # whitening), channel_deconv (channel-only whitening), none (plain convs with bias).
    norm: str = checked_field("deconv", choices=("deconv", "bn", "gn", "iternorm", "channel_deconv", "none"))
    deconv: DeconvConfig = field(default_factory=DeconvConfig)
    gn_groups: int = checked_field(32, ge=1)  # GroupNorm groups (norm: gn), as in the GroupNorm paper
    iternorm: IterNormConfig = field(default_factory=IterNormConfig)
    channel_deconv: ChannelDeconvConfig = field(default_factory=ChannelDeconvConfig)
    aux_loss: bool = False  # auxiliary FCN head on the stride-16 stage
    num_classes: int = checked_field(19, ge=1)
    pretrained: str | None = None  # local file of encoder or model weights; nothing is downloaded
    # Classification heads, as the paper's main.py: block_fc > 0 whitens the classifier's input in blocks of
    # that size (fc_whitening: delinear = a Delinear layer, channel_deconv = ChannelDeconv before a Linear).
    block_fc: int = checked_field(0, ge=0)
    fc_whitening: str = checked_field("delinear", choices=("delinear", "channel_deconv"))


@dataclass
class DataConfig(_Section):
    _key = "data"
    # Which dataset reader; each task names the ones it takes (seg/tasks/<task>.py): cityscapes (the Cityscapes
    # layout) for segmentation; cifar10 | cifar100 (the official python archives under root) | mnist |
    # fashion_mnist (the four official idx files in root) | imagenet (root/train/<class>/...) for classification.
    dataset: str = "cityscapes"
    root: str = "datasets/cityscapes"
    train_split: str = "train"
    val_split: str = "val"
    crop_size: list[int] = checked_field(factory=lambda: [512, 1024], length=2, ge=1)  # H, W
    scale_range: list[float] = checked_field(factory=lambda: [0.5, 2.0], length=2, gt=0)  # min, max
    # The other way to draw the training scale: the short side resized to a random integer in [min, max]
    # (the paper's code's RandomResize, e.g. [260, 1040] from its base size 520); scale_range must then be
    # [1.0, 1.0]. null: scale_range decides.
    short_side_range: list[int] | None = checked_field(None, length=2, ge=1)
    # Where the image sits when padded up to the crop (image 0, label 255): center, or top_left (padding at
    # the bottom and right, after the flip, as the paper's code's RandomCrop does).
    pad_position: str = checked_field("center", choices=("center", "top_left"))
    hflip_prob: float = checked_field(0.5, ge=0, le=1)
    # Photometric jitter strengths (0 disables each).
    brightness: float = checked_field(0.25, ge=0)
    contrast: float = checked_field(0.25, ge=0)
    saturation: float = checked_field(0.25, ge=0)
    hue: float = checked_field(0.0, ge=0, le=0.5)
    mean: list[float] = checked_field(factory=lambda: [0.485, 0.456, 0.406], length=3)
    std: list[float] = checked_field(factory=lambda: [0.229, 0.224, 0.225], length=3, gt=0)
    num_workers: int = checked_field(4, ge=0)
    # Validation images resized so that their short side is this (labels nearest), as the paper's code
    # validates at 520; null: full resolution (the benchmark).
    val_short_side: int | None = checked_field(None, ge=1)
    # trainid: the 19 Cityscapes classes, void ignored (255). reference: the paper's code's 21 classes, every
    # void label id class 0 (trained on and scored), the 19 classes 1..19, class 20 never a label; needs
    # model.num_classes 21 (seg/data/labels.py holds both mappings).
    label_mapping: str = checked_field("trainid", choices=("trainid", "reference"))

    def check(self) -> None:
        if self.scale_range[0] > self.scale_range[1]:
            raise ConfigError(
                f"key 'data.scale_range' has value {self.scale_range}, expected [min, max] with min <= max"
            )
        if self.short_side_range is not None:
            if self.short_side_range[0] > self.short_side_range[1]:
                raise ConfigError(f"key 'data.short_side_range' has value {self.short_side_range}, "
                                  f"expected [min, max] with min <= max")
            if self.scale_range != [1.0, 1.0]:
                raise ConfigError(f"key 'data.scale_range' has value {self.scale_range} while data.short_side_range "
                                  f"is set; expected [1.0, 1.0] (one of the two draws the training scale)")


@dataclass
class TrainConfig(_Section):
    _key = "train"
    batch_size: int = checked_field(8, ge=1)  # per process
    iterations: int = checked_field(11160, ge=1)  # 30 epochs of 2975 images at batch 8
    lr: float = checked_field(0.1, gt=0)
    momentum: float = checked_field(0.9, ge=0, lt=1)
    weight_decay: float = checked_field(1e-4, ge=0)
    schedule: str = checked_field("poly", choices=("poly", "cosine"))  # learning-rate decay per iteration
    poly_power: float = checked_field(0.9, ge=0)
    warmup_iters: int = checked_field(0, ge=0)
    warmup_ratio: float = checked_field(0.1, ge=0, le=1)
    aux_weight: float = checked_field(0.4, ge=0)
    grad_clip: float | None = checked_field(None, gt=0)  # max gradient norm (null: no clipping)
    # auto (bf16 on CUDA if supported, else fp16; off on CPU) | bf16 | fp16 | none
    amp: str = checked_field("auto", choices=("auto", "bf16", "fp16", "none"))
    ignore_index: int = checked_field(255, ge=0)
    # Each task names the losses it takes (seg/tasks/<task>.py). ce: cross-entropy (both tasks). Classification
    # also l2, the reference's --loss L2: the squared error of the logits against one-hot targets, halved, summed
    # over classes and averaged over the batch. Segmentation also ohem: online hard example mining as
    # mmsegmentation's OHEMPixelSampler (seg/tasks/pixel_loss.py): pixels whose true-class probability is below
    # max(ohem_thresh, the ohem_min_kept-th smallest) train.
    loss: str = "ce"
    ohem_thresh: float = checked_field(0.7, gt=0, le=1)
    # per step, over the whole batch (mmsegmentation's Cityscapes value)
    ohem_min_kept: int = checked_field(100000, ge=0)
    # Segmentation: a weight per class for the pixel loss (model.num_classes values; null: all 1).
    class_weights: list[float] | None = checked_field(None, gt=0)
    seed: int = checked_field(0, ge=0)
    log_interval: int = checked_field(20, ge=1)
    val_interval: int = checked_field(1000, ge=1)
    checkpoint_interval: int = checked_field(500, ge=1)
    val_max_images: int | None = checked_field(None, ge=1)  # validate on a subset (null: the whole split)
    # CUDA: cudnn.benchmark (the fastest algorithms for the shapes seen) unless this asks for deterministic ones
    deterministic: bool = False
    channels_last: bool = False  # model and inputs in NHWC memory format (tensor-core convolutions prefer it)
    # torch.compile the training forward pass (torch's mode names; none: eager); no CUDA-graph modes: FastDeconv
    # updates its statistics in place and branches on its step counter. Validation stays eager.
    compile: str = checked_field("none", choices=("none", "default", "max-autotune-no-cudagraphs"))


@dataclass
class EvalConfig(_Section):
    _key = "eval"
    mode: str = checked_field("whole", choices=("whole", "slide"))
    crop_size: list[int] = checked_field(factory=lambda: [1024, 1024], length=2, ge=1)  # slide windows, H, W
    stride: list[int] = checked_field(factory=lambda: [768, 768], length=2, ge=1)
    scales: list[float] = checked_field(factory=lambda: [1.0], gt=0)
    flip: bool = False
    batch_size: int = checked_field(1, ge=1)
    # Also score the paper's code's way (NOT the benchmark metric): void is class 0 and counted, the mean of
    # all 21 IoUs (class 20 never occurs: IoU 0), at short side 520 (images resized there unless the data
    # already is). Reported as miou_reference next to the 19-class mIoU of the same predictions.
    reference_compat: bool = False


@dataclass
class Config(_Section):
    task: str = "segmentation"  # a task of seg/tasks/ (TASK_RULES): segmentation, classification
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    work_dir: str | None = None  # default: checkpoints/<config file stem>

    def check(self) -> None:
        if not TASK_RULES:
            importlib.import_module(TASKS_PACKAGE)
        if self.task not in TASK_RULES:
            known = ", ".join(TASK_RULES) or f"none registered (importing {TASKS_PACKAGE} registered none)"
            raise ConfigError(f"key 'task' has value {self.task!r}, expected one of {known}")
        TASK_RULES[self.task](self)


def check_choice(key: str, value: Any, choices: typing.Iterable[Any]) -> None:
    """A task rule: ``value`` of ``key`` is one of ``choices`` (the one-line error of a field's ``choices``)."""
    _check_value(key, value, {"choices": tuple(choices)})


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
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except ConfigError:
                continue  # the next member of the union may fit; the error names the whole union
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


def read_yaml(path: Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file's top-level mapping (empty file: {}); a missing file or bad YAML is a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
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
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: key 'base' must be a file name, got {base!r}")
        base_path = (path.parent / base).resolve()
        base_data = read_yaml(base_path)
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
        cfg = from_dict(merged, f"override '{text}' on {path}")
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
