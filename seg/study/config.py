"""Study files: variants x seeds over one base training config, read into a :class:`Study` and checked.

A study file is YAML with the keys ``name``, ``base``, ``seeds``, ``baseline``, ``variants`` and optionally
``opts`` and ``sweep`` (see studies/README.md). :func:`plan_runs` turns it into one :class:`RunSpec` per (variant,
seed), each with its training config already validated, so a typo fails before anything starts. With a ``sweep``,
:func:`plan_sweep_runs` gives the selection runs (variant x swept value x selection seed), which come first; the
reported runs then train each variant at the value its selection picked (``picks``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seg.config import Config, ConfigError, load_config, parse_override, read_yaml

# A relative ``base:`` is read from the repository root (where configs/ lives), wherever the study file is.
REPO_ROOT = Path(__file__).resolve().parents[2]
KEYS = ("name", "base", "seeds", "baseline", "opts", "variants", "sweep", "report_at")
SWEEP_KEYS = ("key", "values", "seeds", "opts", "rule", "extend")
# How a sweep picks each variant's value (the rule is named in the study file, so it is fixed before the runs).
RULES = {
    "best_mean_final": "the value with the highest mean final validation metric over the selection seeds; a "
                       "diverged selection run scores 0 (the metric's floor); ties go to the first of them in the "
                       "values' order",
}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # study and variant names become folder names


@dataclass
class Sweep:
    """One setting swept per variant on selection seeds apart from the reported ones (``study.sweep``)."""

    key: str  # a dotted config key, e.g. train.lr
    values: dict[str, list[Any]]  # variant -> the values it tries, in file order
    seeds: list[int]  # selection seeds; never among the study's reported seeds
    opts: list[str] = field(default_factory=list)  # overrides for the selection runs only (after the variant's)
    rule: str = "best_mean_final"
    # A pick at an end of a variant's values adds the next value beyond it (same ratio as the two values at that
    # end, 3 significant digits), at most this many times per end; 0: the values as listed.
    extend: int = 0

    @property
    def leaf(self) -> str:
        """The key's last part, for folder and figure names (``lr`` for ``train.lr``)."""
        return self.key.rsplit(".", 1)[-1]

    def override(self, value: Any) -> str:
        return f"{self.key}={value}"

    def folder(self, value: Any) -> str:
        return f"{self.leaf}_{value}"


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
    sweep: Sweep | None = None
    report_at: list[int] = field(default_factory=list)  # iterations (e.g. one epoch) reported besides the final

    def overrides(self, variant: str, seed: int, cli_opts: list[str] | None = None, extra: list[str] | None = None
                  ) -> list[str]:
        """The ``--opts`` of one run: study opts, variant opts, ``extra`` (a sweep's value and opts),
        command-line opts, then the seed."""
        return [*self.opts, *self.variants[variant], *(extra or []), *(cli_opts or []), f"train.seed={seed}"]


@dataclass
class RunSpec:
    """One training run of a study: where it goes and the config it trains (validated)."""

    variant: str
    seed: int
    work_dir: Path
    base: Path  # the training config file
    overrides: list[str]
    cfg: Config
    value: Any = None  # the swept value of a selection run (None: a reported run)

    @property
    def selection(self) -> bool:
        return self.value is not None

    @property
    def label(self) -> str:
        """How logs name the run: ``bn/seed0``, or ``bn/lr_0.1/seed100`` for a selection run."""
        return f"{self.key[0]}/seed{self.seed}"

    @property
    def key(self) -> tuple[str, int]:
        """Unique within a study: (variant, seed), or (``variant/<leaf>_<value>``, seed) for a selection run."""
        return (f"{self.variant}/{self.work_dir.parent.name}" if self.selection else self.variant), self.seed


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


def _seeds(path: Path, value: Any, key: str = "seeds") -> list[int]:
    if not isinstance(value, list) or not value:
        raise _fail(path, key, f"has value {value!r}, expected a non-empty list of integers >= 0")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        raise _fail(path, key, f"has value {value!r}, expected integers >= 0")
    if len(set(value)) != len(value):
        raise _fail(path, key, f"has value {value!r}, which repeats a seed")
    return list(value)


def _variants(path: Path, value: Any) -> dict[str, list[str]]:
    if not isinstance(value, dict) or not value:
        raise _fail(path, "variants", f"has value {value!r}, expected a non-empty mapping of name -> overrides")
    return {_name(path, "variants", k): _overrides(path, f"variants.{k}", v) for k, v in value.items()}


def _scalar_list(path: Path, key: str, value: Any) -> list[Any]:
    ok = isinstance(value, list) and value and all(
        isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value)
    if not ok:
        raise _fail(path, key, f"has value {value!r}, expected a non-empty list of numbers or strings")
    if len(set(map(str, value))) != len(value):
        raise _fail(path, key, f"has value {value!r}, which repeats a value")
    for v in value:
        if not _SAFE_NAME.match(str(v)):
            raise _fail(path, key, f"has value {v!r}, expected values of letters, digits, '_', '.', '-' "
                                   "(they name folders)")
    return list(value)


def _sweep(path: Path, value: Any, variants: dict[str, list[str]], seeds: list[int]) -> Sweep | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail(path, "sweep", f"has value {value!r}, expected a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = [k for k in value if k not in SWEEP_KEYS]
    if unknown:
        raise _fail(path, f"sweep.{unknown[0]}", f"is unknown; valid keys: {', '.join(SWEEP_KEYS)}")
    missing = [k for k in ("key", "values", "seeds", "rule") if k not in value]
    if missing:
        raise _fail(path, f"sweep.{missing[0]}", "is missing")
    key = value["key"]
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", key):
        raise _fail(path, "sweep.key", f"has value {key!r}, expected a dotted config key such as train.lr")
    if key == "train.seed":
        raise _fail(path, "sweep.key", "is train.seed; the seeds come from the keys 'seeds' and 'sweep.seeds'")
    raw = value["values"]
    if isinstance(raw, dict):  # one list per variant
        missing_v = [v for v in variants if v not in raw]
        extra_v = [v for v in raw if v not in variants]
        if missing_v or extra_v:
            raise _fail(path, "sweep.values", f"names variants {sorted(raw)}, expected exactly the variants "
                                              f"{', '.join(variants)}")
        values = {v: _scalar_list(path, f"sweep.values.{v}", raw[v]) for v in variants}
    else:
        shared = _scalar_list(path, "sweep.values", raw)
        values = {v: list(shared) for v in variants}
    sel_seeds = _seeds(path, value["seeds"], "sweep.seeds")
    common = sorted(set(sel_seeds) & set(seeds))
    if common:
        raise _fail(path, "sweep.seeds", f"has value {sel_seeds!r}, which shares seeds {common} with 'seeds': "
                                         "selection and reported runs must not be the same runs")
    rule = value["rule"]
    if rule not in RULES:
        raise _fail(path, "sweep.rule", f"has value {rule!r}, expected one of {', '.join(RULES)}")
    opts = _overrides(path, "sweep.opts", value.get("opts"))
    extend = value.get("extend", 0)
    if not isinstance(extend, int) or isinstance(extend, bool) or extend < 0:
        raise _fail(path, "sweep.extend", f"has value {extend!r}, expected an integer >= 0")
    if extend and not all(isinstance(x, (int, float)) and x > 0 and len(vals) > 1 for vals in values.values()
                          for x in vals):
        raise _fail(path, "sweep.extend", "needs at least two positive numbers in every variant's values "
                                          "(it continues their ratio)")
    for name, over in variants.items():
        for text in over:
            if ".".join(_parse(path, f"variants.{name}", text)[0]) == key:
                raise _fail(path, f"variants.{name}", f"sets the swept key {key} ('{text}'); the sweep sets it")
    return Sweep(key, values, sel_seeds, opts, rule, extend)


def _iterations(path: Path, value: Any) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                              for v in value):
        raise _fail(path, "report_at", f"has value {value!r}, expected a list of iterations >= 1")
    return sorted(set(value))


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
    missing = [k for k in KEYS if k not in ("opts", "sweep", "report_at") and k not in data]
    if missing:
        raise ConfigError(f"{path}: missing key '{missing[0]}'")
    variants = _variants(path, data["variants"])
    baseline = data["baseline"]
    if baseline not in variants:
        raise _fail(path, "baseline", f"has value {baseline!r}, expected one of the variants: {', '.join(variants)}")
    seeds = _seeds(path, data["seeds"])
    return Study(
        name=_name(path, "name", data["name"]),
        base=_base(path, data["base"]),
        seeds=seeds,
        baseline=baseline,
        variants=variants,
        opts=_overrides(path, "opts", data.get("opts")),
        source=path,
        sweep=_sweep(path, data.get("sweep"), variants, seeds),
        report_at=_iterations(path, data.get("report_at")),
    )


def _check_cli_opts(study: Study, cli_opts: list[str] | None) -> None:
    for text in cli_opts or []:
        keys, _ = parse_override(text)  # its message names the override
        if keys == ["train", "seed"]:
            raise ConfigError(f"--opts sets train.seed ('{text}'); the seeds come from {study.source}")
        if study.sweep is not None and ".".join(keys) == study.sweep.key:
            raise ConfigError(f"--opts sets the swept key ('{text}'); the sweep in {study.source} sets it")


def _spec(study: Study, variant: str, seed: int, work_dir: Path, overrides: list[str], value: Any = None
          ) -> RunSpec:
    try:
        cfg = load_config(study.base, overrides)
    except ConfigError as e:
        what = f"variant '{variant}'" + ("" if value is None else f" at {study.sweep.key}={value}")
        raise ConfigError(f"{study.source}: {what} (seed {seed}): {e}") from None
    return RunSpec(variant, seed, work_dir, study.base, overrides, cfg, value)


def plan_sweep_runs(study: Study, out: Path, cli_opts: list[str] | None = None,
                    values: dict[str, list[Any]] | None = None) -> list[RunSpec]:
    """The selection runs (variant x value x selection seed, in file order) into
    ``out/<variant>/sweep/<leaf>_<value>/seed<k>``; ``values`` (variant -> values) replaces the file's, e.g. for
    the values an extension adds; [] without a sweep."""
    _check_cli_opts(study, cli_opts)
    sweep = study.sweep
    if sweep is None:
        return []
    values = sweep.values if values is None else values
    specs = []
    for variant in study.variants:
        for value in values.get(variant, []):
            extra = [sweep.override(value), *sweep.opts]
            for seed in sweep.seeds:
                work_dir = out / variant / "sweep" / sweep.folder(value) / f"seed{seed}"
                specs.append(_spec(study, variant, seed, work_dir, study.overrides(variant, seed, cli_opts, extra),
                                   value))
    if specs:
        study_task(study, specs)
    return specs


def plan_runs(study: Study, out: Path, cli_opts: list[str] | None = None, picks: dict[str, Any] | None = None
              ) -> list[RunSpec]:
    """Every reported (variant, seed) run with its config loaded and checked, in file order (variants, then
    seeds); all of one task (:func:`study_task`). With a sweep, ``picks`` (variant -> picked value) sets the swept
    key of each variant's runs; a variant without a pick has no runs yet."""
    _check_cli_opts(study, cli_opts)
    specs = []
    for variant in study.variants:
        extra = []
        if study.sweep is not None:
            if picks is None or variant not in picks:
                continue
            extra = [study.sweep.override(picks[variant])]
        for seed in study.seeds:
            overrides = study.overrides(variant, seed, cli_opts, extra)
            specs.append(_spec(study, variant, seed, out / variant / f"seed{seed}", overrides))
    if specs:
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
