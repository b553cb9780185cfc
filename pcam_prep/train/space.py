"""`pcam-prep sweep` settings and search space: read from TOML, checked up front, sampled by an Optuna trial.

A spec file has two tables, both optional:

    [train]                 # fixed TrainConfig settings for every trial
    epochs = 3
    [space.lr]              # a range: low, high, log (default false); ints stay ints
    low = 1e-4
    high = 1e-2
    log = true
    [space.optimizer]       # a choice
    choices = ["adamw", "sgd"]

Parameters are TrainConfig fields; anything else is refused with its name. This module never
imports Optuna or torch (the CLI imports it to parse options): `suggest` takes any object
with Optuna's `suggest_*` methods.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PcamPrepError
from ..files import read_toml
from .config import DEVICES, TrainConfig, _check_choice, _check_positive

SEARCHABLE = ("lr", "lr_backbone", "batch_size", "weight_decay", "warmup", "optimizer", "arch", "augment", "width",
              "input_size", "freeze_backbone")
FIXED_BY_SWEEP = ("shards", "out", "resume")  # every trial gets its own run folder under SWEEP
RANGE_KEYS = {"low", "high", "log"}


@dataclass(frozen=True)
class SweepConfig:
    shards: Path  # built OUT folder every trial trains on
    out: Path = Path("runs/sweep")  # SWEEP folder: study.db, trial-N/ runs, trials.csv, best.json
    trials: int = 20  # finished (complete or pruned) trials the study should hold; a rerun adds the rest
    space: Path | None = None  # TOML spec ([train] fixed settings, [space.NAME] ranges); None: the default space
    storage: str | None = None  # Optuna RDB URL; None: sqlite:///OUT/study.db
    study: str = "pcam-prep"  # study name inside the storage
    epochs: int | None = None  # epochs per trial; None: the spec's [train] epochs, else 3
    seed: int = 0  # sampler seed and every trial's training seed (same data order: a fair comparison)
    device: str = "auto"  # auto: cuda when available, else cpu
    startup_trials: int = 2  # the median pruner prunes nothing until this many trials have finished
    warmup_epochs: int = 1  # ... and judges a trial only after this many of its epochs

    def __post_init__(self) -> None:
        _check_positive(trials=self.trials, startup_trials=self.startup_trials)
        _check_positive(epochs=self.epochs, allow_none=True)
        _check_choice("device", self.device, DEVICES)
        if self.warmup_epochs < 0:
            raise PcamPrepError(f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'study.db').resolve()}"


@dataclass(frozen=True)
class Param:
    """One dimension: a range [low, high] (log-uniform when `log`) or a list of choices."""

    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]  # sampled per trial, in this order
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)  # TrainConfig settings shared by all trials

    def suggest(self, trial: Any) -> dict[str, Any]:
        """One trial's TrainConfig settings: the fixed ones, then the sampled ones."""
        return {**self.fixed, **{p.name: p.suggest(trial) for p in self.params}}


def installed_archs() -> list[str]:
    """The default arch choices: the built-in ones, plus timm:resnet18 when timm is installed."""
    return ["small", "resnet"] + (["timm:resnet18"] if importlib.util.find_spec("timm") else [])


def default_space() -> SearchSpace:
    """lr log-uniform, batch size, weight decay, optimiser, arch among those installed, augmentation on/off."""
    return SearchSpace((
        Param("lr", 1e-4, 1e-2, log=True),
        Param("batch_size", choices=(64, 128, 256)),
        Param("weight_decay", 0.0, 0.1),
        Param("optimizer", choices=("adamw", "sgd")),
        Param("arch", choices=tuple(installed_archs())),
        Param("augment", choices=(True, False)),
    ))


def load_space(path: Path | None) -> SearchSpace:
    """The space in a spec file (see the module docstring), or `default_space()` when `path` is None."""
    if path is None:
        return default_space()
    return parse_space(read_toml(path, "--space"), str(path))


def parse_space(data: dict[str, Any], where: str = "space") -> SearchSpace:
    unknown = sorted(set(data) - {"train", "space"})
    if unknown:
        raise PcamPrepError(f"{where}: unknown table [{unknown[0]}] (a spec has [train] and [space.NAME])")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    fixed = dict(data.get("train", {}))
    for key in fixed:
        if key not in fields or key in FIXED_BY_SWEEP:
            raise PcamPrepError(f"{where}: [train] key {key!r} is not a train setting the sweep can fix")
    params = tuple(parse_param(name, spec, where) for name, spec in data.get("space", {}).items())
    if not params:
        raise PcamPrepError(f"{where}: no [space.NAME] tables: nothing to search")
    clash = next((p.name for p in params if p.name in fixed), None)
    if clash:
        raise PcamPrepError(f"{where}: {clash!r} is both fixed in [train] and searched in [space]")
    return SearchSpace(params, fixed)


def parse_param(name: str, spec: Any, where: str) -> Param:
    """One [space.NAME] table, checked: a known name, known keys, a non-empty range or choice list."""
    key = f"space.{name}"
    if name not in SEARCHABLE:
        raise PcamPrepError(f"{where}: unknown parameter [{key}]; searchable: {', '.join(SEARCHABLE)}")
    if not isinstance(spec, dict):
        raise PcamPrepError(f"{where}: [{key}] must be a table with low/high or choices")
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices"})
        if extra:
            raise PcamPrepError(f"{where}: unknown key {extra[0]!r} in [{key}] (choices go alone)")
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise PcamPrepError(f"{where}: [{key}] choices is empty: give at least one value")
        return Param(name, choices=tuple(spec["choices"]))
    extra = sorted(set(spec) - RANGE_KEYS)
    if extra:
        raise PcamPrepError(f"{where}: unknown key {extra[0]!r} in [{key}] (use low, high, log or choices)")
    low, high, log = spec.get("low"), spec.get("high"), spec.get("log", False)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
        raise PcamPrepError(f"{where}: [{key}] needs numeric low and high, got low={low!r} high={high!r}")
    if not low < high:
        raise PcamPrepError(f"{where}: [{key}] is an empty range: low={low!r} is not below high={high!r}")
    if log and low <= 0:
        raise PcamPrepError(f"{where}: [{key}] log=true needs low > 0, got {low!r}")
    return Param(name, low, high, bool(log))
