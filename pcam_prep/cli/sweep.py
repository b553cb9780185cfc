"""`pcam-prep sweep`: parse options, build a SweepConfig, call `train.sweep.sweep`, print the trials table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..train.config import DEVICES
from ..train.space import SweepConfig
from .common import friendly_errors

SHOWN = ("trial", "state", "best_val_auc", "epochs", "seconds")


def _default(name: str) -> Any:
    return SweepConfig.__dataclass_fields__[name].default


@click.command()
@click.option("--shards", default=Path("shards"), show_default=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path), help="Built OUT folder to train on.")
@click.option("--out", default=_default("out"), show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="SWEEP folder: study.db, trial-N/ runs, trials.csv, best.json.")
@click.option("--trials", type=click.IntRange(min=1), default=_default("trials"), show_default=True,
              help="Finished trials the study should hold; a rerun adds only the missing ones.")
@click.option("--space", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML search space ([train] fixed settings, [space.NAME] ranges), e.g. pipelines/sweep.toml  "
                   "[default: lr, batch size, weight decay, optimiser, arch, augmentation]")
@click.option("--storage", help="Optuna storage URL; the same postgresql://... on several machines shares one "
                                "study  [default: sqlite:///SWEEP/study.db]")
@click.option("--study", default=_default("study"), show_default=True, help="Study name inside the storage.")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs per trial  [default: the spec's, else 3]")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Sampler and training seed (give each machine of a shared study its own).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="auto: cuda when available.")
@click.option("--startup-trials", type=click.IntRange(min=1), default=_default("startup_trials"), show_default=True,
              help="The median pruner prunes nothing until this many trials finished.")
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=_default("warmup_epochs"), show_default=True,
              help="... and judges a trial only after this many of its epochs.")
@friendly_errors
def sweep(**flags: Any) -> None:
    """Search training settings with Optuna: each trial is a `train` run in SWEEP/trial-N/.

    Trials report val AUC per epoch and the median pruner stops weak ones. SWEEP/trials.csv
    lists every trial (parameters, best val AUC, epochs, seconds, state); SWEEP/best.json names
    the best trial and its checkpoint. Ctrl-C stops cleanly; rerunning the same command
    continues the study (an interrupted trial resumes its run).

    \b
    Example:
      pcam-prep sweep --shards shards/ --out runs/sweep --trials 4 --space pipelines/sweep.toml
      pcam-prep sweep --shards shards/ --out runs/sweep --trials 40 --storage postgresql://user@db/pcam
      pcam-prep stats shards/ --report report/ --run runs/sweep
    """
    from ..train.sweep import sweep as run_sweep

    config = SweepConfig(**{k: v for k, v in flags.items() if v is not None})
    result = run_sweep(config, on_trial=lambda row: click.echo(_row_line(row)))
    click.echo(trials_table(result.rows))
    if result.best is not None:
        click.echo(f"best: trial {result.best['trial']}, val AUC {result.best['best_val_auc']:.4f}, "
                   f"checkpoint {config.out / result.best['checkpoint']}")
    if result.interrupted:
        raise click.ClickException(f"interrupted; rerun the same command to continue the study in {config.out}")


def _row_line(row: dict[str, Any]) -> str:
    auc = "-" if row["best_val_auc"] is None else f"{row['best_val_auc']:.4f}"
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in (*SHOWN, "run"))
    return f"trial {row['trial']}: {row['state']}  val AUC {auc}  {row['epochs']} epochs  {row['seconds']:.0f}s  {params}"


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trials_table(rows: list[dict[str, Any]]) -> str:
    """The trials as a Markdown table (what trials.csv holds)."""
    if not rows:
        return "no trials yet"
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r.get(c) is None else _fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
