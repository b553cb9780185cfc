"""`pcam-prep stats`: parse options, collect the stats, print them (and draw the report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .cli import Bars, friendly_errors


@click.command()
@click.argument("target", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--report", type=click.Path(file_okay=False, path_type=Path),
              help="Write PNG figures and index.html into this folder.")
@click.option("--run", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Trainer run folder whose curves/ROC/confusion figures the report includes (needs --report).")
@click.option("--workers", type=click.IntRange(min=1), help="Parallel workers  [default: one per core]")
@click.option("--scheduler", help="threads | processes | sync | tcp://HOST:PORT (dask.distributed)")
@click.option("--sample-per-label", type=click.IntRange(min=1), default=16, show_default=True,
              help="Patches per label in the report's sample grid.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for picking the sample patches.")
@friendly_errors
def stats(target: Path, as_json: bool, report: Path | None, run: Path | None, workers: int | None,
          scheduler: str | None, sample_per_label: int, seed: int) -> None:
    """Describe a dataset: counts, folds, label balance, mean/std, rejects, duplicates, background.

    TARGET is a built folder (read through its manifest.json and arrays) or a raw Kaggle-layout
    folder (its root or its train/ folder), which is decoded, validated, de-duplicated and
    fold-assigned exactly as `build` would with default settings (5 folds, seed 0), writing
    nothing. A patch counts as background when its mean HSV saturation is below 0.07.

    \b
    Example:
      pcam-prep stats shards/
      pcam-prep stats data/demo --json > stats.json
      pcam-prep stats shards/ --report report/ --run runs/resnet18
    """
    from .eda import EdaOptions, collect

    if run is not None and report is None:
        raise click.UsageError("--run RUN only adds figures to a report: pass --report DIR too")
    options = EdaOptions(workers, scheduler, sample_per_label if report else 0, seed)
    bars = Bars()
    eda = collect(target, options, progress=bars)
    bars.close()
    click.echo(json.dumps(eda.summary, indent=2) if as_json else format_stats(eda.summary))
    if report is not None:
        from .report import write_report

        index = write_report(eda, report, run)
        click.echo(f"report: {index}", err=as_json)  # keep stdout one JSON object


def format_stats(summary: dict[str, Any]) -> str:
    """The stats object as an aligned plain-text table."""
    train, test = summary["splits"]["train"], summary["splits"]["test"]
    background = summary["background"]
    by_label = background["train"]["by_label"]
    lines = [
        f"{summary['target']}  ({summary['kind']}, read from {summary['source']})",
        f"image shape  {' x '.join(map(str, summary['image_shape']))}",
        "",
        f"{'split':<10}{'images':>10}{'label 0':>10}{'label 1':>10}{'label 1 %':>11}{'background %':>14}",
        f"{'train':<10}{train['count']:>10,}{train['negatives']:>10,}{train['positives']:>10,}"
        f"{_pct(train['positive_share']):>11}{_pct(background['train']['share']):>14}",
        f"{'  label 0':<51}{_pct(by_label['0']['share']):>14}",
        f"{'  label 1':<51}{_pct(by_label['1']['share']):>14}",
        f"{'test':<10}{test['count']:>10,}{'-':>10}{'-':>10}{'-':>11}{_pct(background['test']['share']):>14}",
        "",
        f"{'fold':<10}{'images':>10}{'label 0':>10}{'label 1':>10}{'label 1 %':>11}",
    ]
    for fold in summary["folds"]["counts"]:
        lines.append(f"{fold['fold']:<10}{fold['count']:>10,}{fold['negatives']:>10,}{fold['positives']:>10,}"
                     f"{_pct(fold['positive_share']):>11}")
    lines += ["", f"{'channel':<10}{'mean':>10}{'std':>10}   (0-1 scale, {summary['stats']['images']:,} train images)"]
    lines += [f"{c:<10}{m:>10.4f}{s:>10.4f}" for c, m, s in zip("RGB", summary["stats"]["mean"], summary["stats"]["std"])]
    lines += [
        "",
        f"rejects     {summary['rejects']['count']:>8,}  {_counts(summary['rejects']['by_reason'])}",
        f"duplicates  {summary['duplicates']['count']:>8,}  {_counts(summary['duplicates']['by_kind'])}",
        f"leaked test {summary['duplicates']['leaked_test_images']:>8,}  (test images whose pixels are also in train)",
        f"background: {background['rule']}",
    ]
    return "\n".join(lines)


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in counts.items())
