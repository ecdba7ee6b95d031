"""Study files: variants x seeds over one base training config, read into a :class:`Study` and checked.

A study file is YAML with the keys ``name``, ``base``, ``seeds``, ``baseline``, ``variants`` and optionally
``opts`` (see studies/README.md). :func:`plan_runs` turns it into one :class:`RunSpec` per (variant, seed),
each with its training config already validated, so a typo fails before anything starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seg.config import Config, ConfigError, load_config, parse_override, read_yaml

# A relative ``base:`` is read from the repository root (where configs/ lives), wherever the study file is.
REPO_ROOT = Path(__file__).resolve().parents[2]
KEYS = ("name", "base", "seeds", "baseline", "opts", "variants")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # study and variant names become folder names


@dataclass
class Study:
    """A parsed study file; ``base`` is resolved to an existing file."""

    name: str
    base: Path
    seeds: list[int]
    baseline: str
    variants: dict[str, list[str]]  # variant name -> its overrides, in file order
    opts: list[str] = field(default_factory=list)  # applied to every run, before the variant's
    source: Path = Path("<study>")

    def overrides(self, variant: str, seed: int, cli_opts: list[str] | None = None) -> list[str]:
        """The ``--opts`` of one run: study opts, variant opts, command-line opts, then the seed."""
        return [*self.opts, *self.variants[variant], *(cli_opts or []), f"train.seed={seed}"]


@dataclass
class RunSpec:
    """One training run of a study: where it goes and the config it trains (validated)."""

    variant: str
    seed: int
    work_dir: Path
    base: Path  # the training config file
    overrides: list[str]
    cfg: Config

    @property
    def key(self) -> tuple[str, int]:
        return self.variant, self.seed


def _fail(path: Path, key: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: key '{key}' {message}")


def _name(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str) or not _SAFE_NAME.match(value):
        raise _fail(path, key, f"has value {value!r}, expected a name of letters, digits, '_', '.', '-'")
    return value


def _overrides(path: Path, key: str, value: Any) -> list[str]:
    """A list of ``KEY=VALUE`` strings, each with valid syntax (the keys are checked by :func:`plan_runs`)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, key, f"has value {value!r}, expected a list of KEY=VALUE strings")
    for text in value:
        keys, _ = _parse(path, key, text)
        if keys == ["train", "seed"]:
            raise _fail(path, key, f"sets train.seed ('{text}'); the seeds come from the key 'seeds'")
    return value


def _parse(path: Path, key: str, text: str) -> tuple[list[str], Any]:
    try:
        return parse_override(text)
    except ConfigError as e:
        raise _fail(path, key, f"has a bad override: {e}") from None


def _seeds(path: Path, value: Any) -> list[int]:
    if not isinstance(value, list) or not value:
        raise _fail(path, "seeds", f"has value {value!r}, expected a non-empty list of integers >= 0")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        raise _fail(path, "seeds", f"has value {value!r}, expected integers >= 0")
    if len(set(value)) != len(value):
        raise _fail(path, "seeds", f"has value {value!r}, which repeats a seed")
    return list(value)


def _variants(path: Path, value: Any) -> dict[str, list[str]]:
    if not isinstance(value, dict) or not value:
        raise _fail(path, "variants", f"has value {value!r}, expected a non-empty mapping of name -> overrides")
    return {_name(path, "variants", k): _overrides(path, f"variants.{k}", v) for k, v in value.items()}


def _base(path: Path, value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise _fail(path, "base", f"has value {value!r}, expected a training config file")
    base = Path(value) if Path(value).is_absolute() else REPO_ROOT / value
    if not base.is_file():
        raise _fail(path, "base", f"names {value!r}, but {base} does not exist (relative paths are read from "
                                  f"the repository root {REPO_ROOT})")
    return base


def load_study(path: str | Path) -> Study:
    """Read and check a study file; every error names the file and the key."""
    path = Path(path)
    data = read_yaml(path, "study file")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}'; valid keys: {', '.join(KEYS)}")
    missing = [k for k in KEYS if k != "opts" and k not in data]
    if missing:
        raise ConfigError(f"{path}: missing key '{missing[0]}'")
    variants = _variants(path, data["variants"])
    baseline = data["baseline"]
    if baseline not in variants:
        raise _fail(path, "baseline", f"has value {baseline!r}, expected one of the variants: {', '.join(variants)}")
    return Study(
        name=_name(path, "name", data["name"]),
        base=_base(path, data["base"]),
        seeds=_seeds(path, data["seeds"]),
        baseline=baseline,
        variants=variants,
        opts=_overrides(path, "opts", data.get("opts")),
        source=path,
    )


def plan_runs(study: Study, out: Path, cli_opts: list[str] | None = None) -> list[RunSpec]:
    """Every (variant, seed) run with its config loaded and checked, in file order (variants, then seeds); all
    of one task (:func:`study_task`)."""
    for text in cli_opts or []:
        keys, _ = parse_override(text)  # its message names the override
        if keys == ["train", "seed"]:
            raise ConfigError(f"--opts sets train.seed ('{text}'); the seeds come from {study.source}")
    specs = []
    for variant in study.variants:
        for seed in study.seeds:
            overrides = study.overrides(variant, seed, cli_opts)
            try:
                cfg = load_config(study.base, overrides)
            except ConfigError as e:
                raise ConfigError(f"{study.source}: variant '{variant}' (seed {seed}): {e}") from None
            specs.append(RunSpec(variant, seed, out / variant / f"seed{seed}", study.base, overrides, cfg))
    study_task(study, specs)
    return specs


def study_task(study: Study, specs: list[RunSpec]) -> str:
    """The task every run trains (its metric is what the study compares); ConfigError if the variants differ."""
    tasks = {spec.variant: spec.cfg.task for spec in specs}
    if len(set(tasks.values())) > 1:
        named = ", ".join(f"{v}: {t}" for v, t in tasks.items())
        raise ConfigError(f"{study.source}: the variants train different tasks ({named}); a study compares runs of "
                          "one task on that task's metric")
    return next(iter(tasks.values()))
