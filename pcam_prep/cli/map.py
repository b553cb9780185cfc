"""`pcam-prep map`: the PCam slide (wsi) of every Kaggle id, for leak-free grouped folds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .common import SCHEDULER_HELP, Bars, friendly_errors

_FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command("map")
@click.option("--kaggle", "kaggle_dir", type=_FOLDER, required=True,
              help="Kaggle competition root (train/, test/) or its train/ folder, or an OUT built from one.")
@click.option("--pcam", "pcam_dir", type=_FOLDER, required=True,
              help="Folder of the PCam camelyonpatch_level_2_split_*_{x,y}.h5 files and their _meta.csv.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for groups.csv, kaggle_to_pcam.csv and summary.json (created).")
@click.option("--overwrite", is_flag=True, help="Replace a map already in OUT (default: refuse).")
@click.option("--workers", type=click.IntRange(min=1), help="Local worker processes  [default: one per core]")
@click.option("--scheduler", help=SCHEDULER_HELP)
@click.option("--batch-size", type=click.IntRange(min=1), default=2048, show_default=True,
              help="PCam rows hashed per task.")
@friendly_errors
def map_(kaggle_dir: Path, pcam_dir: Path, out: Path, overwrite: bool, workers: int | None, scheduler: str | None,
         batch_size: int) -> None:
    """Find the PCam split, row and slide (wsi) of every Kaggle id, by the sha1 of the pixels.

    Kaggle names each file by the sha1 of its 96x96x3 pixels, and PCam's meta CSVs name the
    slide of every row, so hashing PCam's rows maps Kaggle ids to slides exactly. Writes to
    OUT: groups.csv (id,group for `build --groups`, Kaggle train ids only), kaggle_to_pcam.csv
    (id,kaggle_split,pcam_split,pcam_index,wsi for train ids; no labels) and summary.json.

    \b
    Example:
      pcam-prep map --kaggle data/kaggle --pcam data/pcam --out data/map
      pcam-prep build --src data/kaggle --out shards/ --groups data/map/groups.csv
    """
    from ..pipeline.slidemap import MapConfig, slide_map

    config = MapConfig(kaggle_dir, pcam_dir, out, overwrite, batch_size, workers, scheduler)
    bars = Bars("img")
    found = slide_map(config, progress=bars)
    bars.close()
    click.echo(format_map_summary(found.summary, out, len(found.groups)))


def format_map_summary(summary: dict[str, Any], out: Path, groups: int) -> str:
    lines = [f"mapped {out}: {groups:,} Kaggle train ids have a PCam slide (groups.csv)"]
    for split, counts in summary["kaggle"].items():
        parts = ", ".join(f"{n:,} {'matched no PCam row' if s == 'unmatched' else 'from PCam ' + s}"
                          for s, n in counts.items())
        lines.append(f"  Kaggle {split:<6}{sum(counts.values()):>9,}: {parts}")
    pcam = summary["pcam_rows"]
    lines.append(f"  PCam rows {sum(pcam.values()):,} ({_per_split(pcam)})")
    lines.append(f"    repeating an earlier PCam row: {_per_split(summary['pcam_rows_repeating_an_earlier_row'])}")
    lines.append(f"    in no Kaggle split:            {_per_split(summary['pcam_rows_in_no_kaggle_split'])}")
    several, slides = summary["kaggle_ids_in_several_pcam_rows"], summary["kaggle_ids_whose_pcam_rows_name_several_wsi"]
    if several:
        lines.append(f"  {several:,} Kaggle ids match several PCam rows ({slides:,} of them on different slides: "
                     "the first row's slide is their group)")
    lines.append(f"  Kaggle ids: {summary['kaggle_ids_from']}")
    return "\n".join(lines)


def _per_split(counts: dict[str, int]) -> str:
    return ", ".join(f"{split} {n:,}" for split, n in counts.items())
