"""`pcam-prep stats`: parse options, collect the stats, print them (and draw the report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .common import SCHEDULER_HELP, Bars, counts_text, friendly_errors, qc_lines


@click.command()
@click.argument("target", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--report", type=click.Path(file_okay=False, path_type=Path),
              help="Write PNG figures and index.html into this folder.")
@click.option("--run", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Trainer run folder whose curves/ROC/confusion figures the report includes (needs --report).")
@click.option("--workers", type=click.IntRange(min=1), help="Parallel workers  [default: one per core]")
@click.option("--scheduler", help=SCHEDULER_HELP)
@click.option("--sample-per-label", type=click.IntRange(min=1), default=16, show_default=True,
              help="Patches per label in the report's sample grid.")
@click.option("--stain-sample", type=click.IntRange(min=0), default=256, show_default=True,
              help="Patches per split sampled for the stain statistics (Macenko vectors, concentrations); 0: none.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for picking the sample patches.")
@friendly_errors
def stats(target: Path, as_json: bool, report: Path | None, run: Path | None, workers: int | None,
          scheduler: str | None, sample_per_label: int, stain_sample: int, seed: int) -> None:
    """Describe a dataset: counts, folds, label balance, mean/std, rejects, duplicates, background, stain.

    TARGET is a built folder (read through its manifest.json and arrays) or a raw Kaggle-layout
    folder (its root or its train/ folder), which is decoded, validated, de-duplicated and
    fold-assigned exactly as `build` would with default settings (5 folds, seed 0), writing
    nothing. A patch counts as background when its mean HSV saturation is below 0.07. Stain:
    Macenko H and E vectors and concentration percentiles per split (and train fold), from a
    seeded sample of --stain-sample patches per split.

    \b
    Example:
      pcam-prep stats shards/
      pcam-prep stats data/demo --json > stats.json
      pcam-prep stats shards/ --report report/ --run runs/train
    """
    from ..eda import EdaOptions, collect

    if run is not None and report is None:
        raise click.UsageError("--run RUN only adds figures to a report: pass --report DIR too")
    options = EdaOptions(workers, scheduler, sample_per_label if report else 0, seed, stain_sample)
    bars = Bars("img")
    eda = collect(target, options, progress=bars)
    bars.close()
    click.echo(json.dumps(eda.summary, indent=2) if as_json else format_stats(eda.summary))
    if report is not None:
        from ..eda.report import write_report

        index = write_report(eda, report, run)
        click.echo(f"report: {index}", err=as_json)  # keep stdout one JSON object


def format_stats(summary: dict[str, Any]) -> str:
    """The stats object as aligned plain-text tables."""
    head = (f"{summary['target']}  ({summary['kind']}, read from {summary['source']})\n"
            f"image shape  {' x '.join(map(str, summary['image_shape']))}")
    parts = [head, _splits(summary), _folds(summary), _channels(summary), _problems(summary)]
    return "\n\n".join(parts + ([format_stain(summary["stain"])] if summary.get("stain") else []))


def _row(name: str, count: Any = "", negatives: Any = "", positives: Any = "", share: Any = "", bg: Any = "") -> str:
    cells = [f"{v:,}" if isinstance(v, int) else v for v in (count, negatives, positives)]
    return f"{name:<10}{cells[0]:>10}{cells[1]:>10}{cells[2]:>10}{share:>11}{bg:>14}".rstrip()


def _splits(summary: dict[str, Any]) -> str:
    """Every split the manifest lists (Kaggle: train, test; PCam: train, valid, test, all labelled)."""
    background = summary["background"]
    lines = [_row("split", "images", "label 0", "label 1", "label 1 %", "background %")]
    for name, split in summary["splits"].items():
        bg = _pct(background[name]["share"])
        if split["labelled"]:
            lines.append(_row(name, split["count"], split["negatives"], split["positives"],
                              _pct(split["positive_share"]), bg))
            lines += [_row(f"  label {k}", bg=_pct(part["share"])) for k, part in background[name]["by_label"].items()]
        else:
            lines.append(_row(name, split["count"], "-", "-", "-", bg))
    return "\n".join(lines)


def _folds(summary: dict[str, Any]) -> str:
    lines = [_row("fold", "images", "label 0", "label 1", "label 1 %")]
    lines += [_row(str(f["fold"]), f["count"], f["negatives"], f["positives"], _pct(f["positive_share"]))
              for f in summary["folds"]["counts"]]
    return "\n".join(lines)


def _channels(summary: dict[str, Any]) -> str:
    stats = summary["stats"]
    lines = [f"{'channel':<10}{'mean':>10}{'std':>10}   (0-1 scale, {stats['images']:,} train images)"]
    if stats["mean"] is None:  # a build kept no train image (--allow-empty)
        return "\n".join(lines + ["(no train images: no channel statistics)"])
    lines += [f"{c:<10}{m:>10.4f}{s:>10.4f}" for c, m, s in zip("RGB", stats["mean"], stats["std"])]
    return "\n".join(lines)


def _problems(summary: dict[str, Any]) -> str:
    rejects, duplicates = summary["rejects"], summary["duplicates"]
    return "\n".join([
        f"rejects     {rejects['count']:>8,}  {counts_text(rejects['by_reason'])}",
        f"duplicates  {duplicates['count']:>8,}  {counts_text(duplicates['by_kind'])}",
        f"leaked test {duplicates['leaked_test_images']:>8,}  (test images whose pixels are also in train)",
        f"kept copies {duplicates.get('kept_copies', 0):>8,}  (held-out images repeating another's pixels; kept)",
        f"sha1 ids    {summary['ids']['sha1_mismatch']:>8,}  not the sha1 of their pixels (Kaggle ids are)",
        *qc_lines(summary.get("qc")),
        f"background: {summary['background']['rule']}",
    ])


def format_stain(stain: dict[str, Any]) -> str:
    """One line per split: tissue patches, mean H and E OD vectors, concentration p1/p50/p99, angle to train."""
    lines = [f"stain (Macenko; {stain['sample_per_split']:,} sampled patches per split, seed {stain['seed']}; "
             f"concentrations in the basis of the {stain['basis']['from']})",
             f"{'split':<10}{'tissue':>8}  {'H vector (R,G,B OD)':<22}{'E vector':<22}{'H p1/p50/p99':<20}"
             f"{'E p1/p50/p99':<20}angle to train H/E"]
    for name, part in stain["splits"].items():
        pct = part["concentration_percentiles"] or {}
        angle = part.get("angle_to_train_deg")
        lines.append(f"{name:<10}{part['tissue_patches']:>8,}  {_vector(part['H']):<22}{_vector(part['E']):<22}"
                     f"{_percentiles(pct.get('H')):<20}{_percentiles(pct.get('E')):<20}"
                     + (f"{angle['H']}° / {angle['E']}°" if angle and angle["H"] is not None else ""))
    return "\n".join(lines)


def _vector(values: list[float] | None) -> str:
    return "-" if values is None else ",".join(f"{v:.2f}" for v in values)


def _percentiles(values: dict[str, float] | None) -> str:
    return "-" if values is None else "/".join(f"{v:.2f}" for v in values.values())


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}"
