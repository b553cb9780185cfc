"""`pcam-prep cv`: train every fold (or some), then collect out-of-fold predictions, cv.json and suspect labels.

The training options are `train`'s own click options (those that are TrainConfig fields), so the
two commands cannot drift apart; `--out`, `--val-fold` and `--resume` are cv's business.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from ..train.config import TTA_CHOICES, TrainConfig
from .common import friendly_errors
from .train import _EpochBar, _flags
from .train import train as train_command

PER_FOLD = {"out", "val_fold", "resume", "shards"}  # set by cv for each fold (shards: not needed by --collect)
TRAIN_FIELDS = set(TrainConfig.__dataclass_fields__)
DEFAULT_RUN = Path("runs/cv")


def _parse_folds(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...] | None:
    if value.strip() == "all":
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected 'all' or fold numbers like 0,2,4; got {value!r}") from None


@click.command()
@click.option("--shards", default=Path("shards"), show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Built OUT folder (from `pcam-prep build`).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_RUN, show_default=True,
              help="Run folder: RUN/fold-K/ per fold, then oof.csv, cv.json, label_review.csv.")
@click.option("--folds", "folds", default="all", show_default=True, callback=_parse_folds,
              help="Folds to train in this process, e.g. 0,2,4 (one per job on a cluster).")
@click.option("--tta", type=click.Choice([str(t) for t in TTA_CHOICES]), default="1", show_default=True,
              help="Dihedral views averaged when scoring each held-out fold (as predict --tta).")
@click.option("--resamples", type=click.IntRange(min=1000), default=1000, show_default=True,
              help="Stratified bootstrap resamples for the 95% CI of the pooled OOF AUC.")
@click.option("--ci-seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@click.option("--collect", "collect_run", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Train nothing: assemble RUN once all its folds are done (names the missing ones).")
@friendly_errors
def cv(shards: Path, out: Path, folds: tuple[int, ...] | None, tta: str, resamples: int, ci_seed: int, collect_run: Path | None,
       **flags: Any) -> None:
    """k-fold cross-validation: one model per fold, out-of-fold predictions, a CI and suspect labels.

    Each fold K trains as `pcam-prep train --val-fold K --out RUN/fold-K` would (same options;
    an interrupted fold resumes, a finished one is skipped) and then scores its held-out fold.
    Once every fold is done, RUN gets oof.csv (id,label,fold,prob), label_review.csv (suspect
    labels, confident learning) and cv.json (per-fold and pooled OOF AUC, mean +- std, 95%
    bootstrap CI, whether the folds were grouped), written last. `predict --run RUN` averages
    the fold models.

    \b
    Example:
      pcam-prep cv --shards shards/ --out runs/cv --epochs 3
      pcam-prep cv --shards shards/ --out runs/cv --folds 2        # one job of a job array
      pcam-prep cv --collect runs/cv                                # once every fold is done
    """
    from ..train.cv import CvConfig, collect, cross_validate

    if collect_run is not None:
        summary = collect(collect_run, resamples, ci_seed)
        click.echo(format_cv(summary, collect_run))
        return
    if not shards.is_dir():
        raise click.BadParameter(f"directory {str(shards)!r} does not exist", param_hint="'--shards'")
    flags["compile"] = flags.pop("compile_", False)
    config = CvConfig(TrainConfig(shards=shards, out=out, **_flags(flags)), folds, int(tta), resamples, ci_seed)
    main_rank = os.environ.get("RANK", "0") == "0"
    bars: dict[int, _EpochBar] = {}

    def progress(fold: int, event: Any) -> None:
        if fold not in bars:
            click.echo(f"fold {fold}")
            bars[fold] = _EpochBar(config.train.epochs)
        bars[fold](event)

    summary = cross_validate(config, progress if main_rank else None)
    for bar in bars.values():
        bar.close()
    if not main_rank:
        return
    if summary is None:
        click.echo(f"trained fold(s) {','.join(map(str, folds or ()))} in {out}; the others are not done yet: "
                   f"`pcam-prep cv --collect {out}` once they are")
        return
    click.echo(format_cv(summary, out))


def format_cv(summary: dict[str, Any], run: Path) -> str:
    """The fold table, the pooled estimate with its CI, and whether the folds were grouped."""
    lines = [f"{'fold':<6}{'images':>8}{'AUC':>9}{'best epoch':>12}{'img/s':>9}{'data wait':>11}"]
    for f in summary["folds"]:
        wait = "-" if f["data_wait_frac"] is None else f"{100 * f['data_wait_frac']:.1f}%"
        speed = "-" if f["images_per_s"] is None else f"{f['images_per_s']:,.0f}"
        lines.append(f"{f['fold']:<6}{f['images']:>8,}{f['auc']:>9.4f}{f['best_epoch']!s:>12}{speed:>9}{wait:>11}")
    ci = summary["ci95"]
    lines += [
        f"pooled OOF AUC {summary['pooled_oof_auc']:.4f}  (95% CI {ci['low']:.4f}-{ci['high']:.4f}, "
        f"{ci['resamples']:,} stratified bootstrap resamples, TTA {summary['tta']})",
        f"mean +- std over {len(summary['folds'])} folds  {summary['mean_fold_auc']:.4f} +- "
        f"{summary['std_fold_auc']:.4f}",
        f"folds grouped by {summary['group_by']}" if summary["grouped"] else f"WARNING: {summary['warning']}",
        f"{summary['suspects']:,} suspect label(s) in {Path(run) / 'label_review.csv'}; results in "
        f"{Path(run) / 'cv.json'}",
    ]
    return "\n".join(lines)


# train's own options (and their defaults, help and types), minus what cv sets per fold
cv.params[:0] = [p for p in train_command.params if (p.name or "").removesuffix("_") in TRAIN_FIELDS - PER_FOLD]
