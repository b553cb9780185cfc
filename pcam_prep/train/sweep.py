"""`pcam-prep sweep`: an Optuna study whose trials are ordinary `train` runs under SWEEP/trial-N/.

The study lives in Optuna's RDB storage (sqlite:///SWEEP/study.db by default; a postgresql://
URL lets several machines run the same command on one study). Every epoch reports the val AUC,
and Optuna's median pruner stops trials that fall behind. Ctrl-C lets the trial save its
last.pt; a rerun of the same command re-queues that trial's parameters and resumes its run, then
goes on until the study holds `trials` finished (complete or pruned) trials.

After every trial SWEEP/trials.csv (one row per trial) and SWEEP/best.json (the best complete
trial and its checkpoint, plus parameter importances once Optuna can compute them) are rewritten.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PcamPrepError
from ..files import write_csv_atomic, write_json_atomic
from ..manifest import read_manifest
from .config import TrainConfig
from .loop import Progress, train
from .space import SearchSpace, SweepConfig, load_space

logger = logging.getLogger(__name__)

TRIAL_COLUMNS = ("trial", "state", "best_val_auc", "epochs", "seconds")
MIN_FOR_IMPORTANCE = 3  # complete trials before importances mean anything


@dataclass(frozen=True)
class SweepResult:
    out: Path
    rows: list[dict[str, Any]]  # trials.csv as dicts
    best: dict[str, Any] | None  # best.json, None before any trial completed
    interrupted: bool = False


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise PcamPrepError("optuna is not installed: pip install -e '.[sweep]' (see the README)") from None
    return optuna


def sweep(config: SweepConfig, on_trial: Callable[[dict[str, Any]], None] | None = None) -> SweepResult:
    """Run the study until it holds `config.trials` finished trials; `on_trial(row)` after each one."""
    optuna = import_optuna()
    space = load_space(config.space)  # a bad spec is refused before anything is written
    read_manifest(config.shards)  # so are shards that cannot train any trial
    config.out.mkdir(parents=True, exist_ok=True)
    study = open_study(optuna, config)
    requeue_interrupted(optuna, study)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def after_trial(study: Any, trial: Any) -> None:
        rows = write_tables(optuna, study, config.out)
        if on_trial is not None:
            on_trial(next(r for r in rows if r["trial"] == trial.number))

    remaining = config.trials - len(study.get_trials(deepcopy=False, states=finished))
    interrupted = False
    try:
        if remaining > 0:
            study.optimize(functools.partial(objective, config=config, space=space, optuna=optuna),
                           n_trials=remaining, callbacks=[optuna.study.MaxTrialsCallback(config.trials, finished),
                                                          after_trial])
    except KeyboardInterrupt:
        interrupted = True
    rows = write_tables(optuna, study, config.out)
    best = json.loads((config.out / "best.json").read_text()) if (config.out / "best.json").is_file() else None
    return SweepResult(config.out, rows, best, interrupted)


def open_study(optuna: Any, config: SweepConfig) -> Any:
    """Create the study, or load it when the storage already holds one of that name (a rerun, another machine)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the CLI reports trials; Optuna's lines repeat them
    pruner = optuna.pruners.MedianPruner(n_startup_trials=config.startup_trials, n_warmup_steps=config.warmup_epochs)
    try:
        return optuna.create_study(storage=config.storage_url, study_name=config.study, direction="maximize",
                                   load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=config.seed),
                                   pruner=pruner)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors: a bad URL or an unreachable server
        raise PcamPrepError(f"--storage: cannot open the study: {type(exc).__name__}: {exc}") from None


def requeue_interrupted(optuna: Any, study: Any) -> None:
    """Queue the parameters of each trial stopped by Ctrl-C once more; that trial resumes its run folder."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried:
            run = t.user_attrs.get("run", f"trial-{t.number}")
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "run": run})
            logger.info("re-queued interrupted trial %d (resumes %s)", t.number, run)


def objective(trial: Any, config: SweepConfig, space: SearchSpace, optuna: Any) -> float:
    """One trial: sample, train under SWEEP/trial-N (or resume an interrupted one), report every epoch."""
    run = trial.user_attrs.get("run", f"trial-{trial.number}")
    trial.set_user_attr("run", run)
    train_config = trial_config(config, space.suggest(trial), config.out / run)
    if train_config.resume:
        for record in json.loads((train_config.out / "metrics.json").read_text()).get("epochs", []):
            report_epoch(trial, record)  # the epochs the interrupted trial had already run

    def on_progress(event: Progress) -> None:
        if event.record is not None:
            report_epoch(trial, event.record)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val AUC {event.record['val_auc']:.4f} below the median at epoch "
                                         f"{event.record['epoch']}")

    try:
        metrics = train(train_config, progress=on_progress)
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)
        raise
    trial.set_user_attr("best_epoch", metrics["best_epoch"])
    return metrics["best_val_auc"] if metrics["best_val_auc"] is not None else math.nan


def trial_config(config: SweepConfig, params: dict[str, Any], out: Path) -> TrainConfig:
    """A trial's TrainConfig: sweep defaults, then the spec's fixed [train] values, then the sampled ones."""
    settings = {"epochs": 3, "device": config.device, "seed": config.seed, **params}
    if config.epochs is not None:
        settings["epochs"] = config.epochs
    resume = (out / "last.pt").is_file() and (out / "metrics.json").is_file()
    return TrainConfig(shards=config.shards, out=out, resume=resume, **settings)


def report_epoch(trial: Any, record: dict[str, Any]) -> None:
    auc = record["val_auc"]
    if not math.isnan(auc):  # a fold with one class has no AUC: nothing to compare
        trial.report(auc, record["epoch"])
    attrs = trial.user_attrs
    best = max(auc, attrs.get("best_val_auc", -math.inf)) if not math.isnan(auc) else attrs.get("best_val_auc")
    trial.set_user_attr("best_val_auc", best)
    trial.set_user_attr("epochs", record["epoch"])
    trial.set_user_attr("seconds", round(attrs.get("seconds", 0.0) + record["seconds"], 3))


def trial_rows(optuna: Any, study: Any) -> list[dict[str, Any]]:
    """One dict per trial: number, state, best val AUC, epochs, training seconds, run folder, then its parameters."""
    trials = study.get_trials(deepcopy=False)
    names = list(dict.fromkeys(n for t in trials for n in t.params))
    rows = []
    for t in trials:
        state = t.state.name.lower()
        if t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("interrupted"):
            state = "interrupted"
        row = {"trial": t.number, "state": state, "best_val_auc": t.user_attrs.get("best_val_auc"),
               "epochs": t.user_attrs.get("epochs", 0), "seconds": t.user_attrs.get("seconds", 0.0),
               **{name: t.params.get(name) for name in names}, "run": t.user_attrs.get("run", "")}
        rows.append(row)
    return rows


def best_summary(optuna: Any, study: Any, out: Path) -> dict[str, Any] | None:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return None
    best = max(complete, key=lambda t: -math.inf if t.value is None or math.isnan(t.value) else t.value)
    run = best.user_attrs.get("run", f"trial-{best.number}")
    summary = {"trial": best.number, "best_val_auc": best.value, "best_epoch": best.user_attrs.get("best_epoch"),
               "params": best.params, "run": run, "checkpoint": f"{run}/best.pt",
               "trials": {"finished": len(complete), "total": len(study.get_trials(deepcopy=False))}}
    importances = param_importances(optuna, study)
    if importances:
        summary["importances"] = importances
    return summary


def param_importances(optuna: Any, study: Any) -> dict[str, float] | None:
    """Optuna's parameter importances, or None while fewer than MIN_FOR_IMPORTANCE trials completed."""
    if len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))) < MIN_FOR_IMPORTANCE:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna warns when few trials make the estimate rough
            return {k: round(float(v), 4) for k, v in optuna.importance.get_param_importances(study).items()}
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        logger.debug("no parameter importances yet: %s", exc)
        return None


def write_tables(optuna: Any, study: Any, out: Path) -> list[dict[str, Any]]:
    """Rewrite OUT/trials.csv and OUT/best.json from the study (every machine's trials); returns the rows."""
    rows = trial_rows(optuna, study)
    columns = list(dict.fromkeys([*TRIAL_COLUMNS, *(k for r in rows for k in r)]))
    write_csv_atomic(out / "trials.csv", columns, (["" if r.get(k) is None else r.get(k) for k in columns]
                                                    for r in rows))
    best = best_summary(optuna, study, out)
    if best is not None:
        write_json_atomic(out / "best.json", best)
    return rows
