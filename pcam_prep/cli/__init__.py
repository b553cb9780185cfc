"""The `pcam-prep` command line: parse options, build a config, call one library function.

Only this module prints. Library errors (PcamPrepError) become click errors here, so users
see one clear line instead of a traceback.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import click

from .. import __version__
from .common import SCHEDULER_HELP, Bars, add_verbose_option, friendly_errors, qc_lines, set_verbosity


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pcam-prep")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Prepare the Kaggle Histopathologic Cancer Detection / PatchCamelyon patches.

    Decode, validate, de-duplicate and fold-assign 96x96 RGB .tif patches once, into
    WebDataset shards, Zarr and HDF5 arrays described by one manifest.json; then train
    the bundled PyTorch model on them and write a Kaggle submission.

    \b
    Example:
      pcam-prep synth data/demo --train 2000 --test 500
      pcam-prep build --src data/demo --out shards/
      pcam-prep stats shards/ --report report/
      pcam-prep train --shards shards/
      pcam-prep predict --shards shards/ --tta 8
    """
    set_verbosity(click.get_current_context(), verbose)


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--train", "n_train", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Number of train patches.")
@click.option("--test", "n_test", type=click.IntRange(min=0), default=250, show_default=True,
              help="Number of test patches.")
@click.option("--valid", "n_valid", type=click.IntRange(min=0),
              help="Number of valid patches (--layout pcam-h5 or kaggle-pcam)  [default: as --test]")
@click.option("--layout", type=click.Choice(["kaggle", "pcam-h5", "kaggle-pcam"]), default="kaggle", show_default=True,
              help="kaggle: train/ and test/ .tif folders; pcam-h5: PatchCamelyon's camelyonpatch_*.h5 files; "
                   "kaggle-pcam: both, OUT/pcam and OUT/kaggle cut from the same patches (for `pcam-prep map`).")
@click.option("--size", type=click.IntRange(min=32), default=96, show_default=True, help="Patch height and width.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; same seed, same bytes.")
@click.option("--label-noise", type=click.FloatRange(0, 0.5), default=0.0, show_default=True,
              help="Share of train labels to flip (kaggle layout); the flipped ids go to OUT/label_noise.csv.")
@friendly_errors
def synth(out: Path, n_train: int, n_test: int, n_valid: int | None, layout: str, size: int, seed: int,
          label_noise: float) -> None:
    """Write a synthetic dataset in the exact Kaggle (or PCam HDF5) layout and file format.

    OUT gets train/<id>.tif, test/<id>.tif, train_labels.csv and sample_submission.csv.
    Patches are H&E-like; labels follow the PCam rule (tumour in the centre 32x32 window),
    and ids are the sha1 of the pixels, as in the real data.

    With --layout pcam-h5, OUT gets camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5
    and _meta.csv (a wsi column: a handful of fake slides), with a few deliberate duplicates
    (two within train, one train patch copied into valid) for the build to report.

    With --layout kaggle-pcam, OUT/pcam gets those PCam files and OUT/kaggle a Kaggle folder of
    the same patches, as Kaggle cut it from PCam: each patch once (PCam train and valid as
    Kaggle train, PCam test as test), a few left out and a few of its own in no PCam file.

    \b
    Example:
      pcam-prep synth data/demo --train 2000 --test 500 --seed 1
      pcam-prep synth data/pcam --layout pcam-h5 --train 2000 --valid 500 --test 500
      pcam-prep synth data/noisy --train 2000 --test 500 --label-noise 0.02
      pcam-prep synth data/pair --layout kaggle-pcam --train 2000 --valid 500 --test 500
    """
    if layout != "kaggle" and label_noise:
        raise click.UsageError("--label-noise is for the kaggle layout (its label_noise.csv names ids)")
    if layout != "kaggle":
        _synth_pcam(out, n_train, n_test if n_valid is None else n_valid, n_test, size, seed, layout == "kaggle-pcam")
        return
    if n_valid is not None:
        raise click.UsageError("--valid is for --layout pcam-h5: the Kaggle layout has no valid split")
    from ..synth import write_kaggle

    bars = Bars("file")
    summary = write_kaggle(out, n_train, n_test, size=size, seed=seed, label_noise=label_noise, progress=bars)
    bars.close()
    click.echo(f"wrote {summary.n_train} train ({summary.positives} positive) and {summary.n_test} test patches to {out}")
    if summary.flipped:
        click.echo(f"flipped {summary.flipped} train label(s) on purpose: {out / 'label_noise.csv'}")


def _synth_pcam(out: Path, n_train: int, n_valid: int, n_test: int, size: int, seed: int, pair: bool) -> None:
    from ..synth import write_pair, write_pcam_h5
    from ..synth.pair import PCAM_DIR

    bars = Bars("img")
    if pair:
        both = write_pair(out, n_train, n_valid, n_test, size=size, seed=seed, progress=bars)
        summary = both.pcam
    else:
        summary = write_pcam_h5(out, n_train, n_valid, n_test, size=size, seed=seed, progress=bars)
    bars.close()
    parts = ", ".join(f"{n} {split}" for split, n in summary.counts.items())
    click.echo(f"wrote {parts} patches as PCam HDF5 files to {out / PCAM_DIR if pair else out} "
               f"({summary.duplicates} deliberate duplicate(s) for dedup to find)")
    if pair:
        kept = ", ".join(f"{n} {split} ({both.unmatched[split]} in no PCam file)" for split, n in both.kaggle.items())
        click.echo(f"wrote {kept} Kaggle patches to {both.out / 'kaggle'}; {both.dropped} distinct PCam patch(es) "
                   "left out on purpose")


def _comma_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


@main.command()
@click.option("--src", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Kaggle competition root (train/, test/, train_labels.csv) or its train/ folder; "
                   "or a folder of PCam camelyonpatch_level_2_split_*_{x,y}.h5 files  [required, here or in --config]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (created)  [required, here or in --config]")
@click.option("--layout", type=click.Choice(["auto", "kaggle", "pcam-h5"]),
              help="How to read --src  [default: auto: pcam-h5 if it holds camelyonpatch_* files, else kaggle]")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Kaggle: id,label CSV  [default: train_labels.csv beside train/]")
@click.option("--test", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Kaggle: test folder  [default: test/ beside train/, if present]")
@click.option("--no-test", is_flag=True, default=None, help="Ignore the test split.")
@click.option("--formats", callback=_comma_list, help="Comma-separated: wds,zarr,hdf5  [default: all]")
@click.option("--folds", type=int, help="Number of stratified folds  [default: 5]")
@click.option("--groups", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="id,group CSV (e.g. slide ids): stratified *group* k-fold  [PCam default: the meta CSV's wsi]")
@click.option("--exclude", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV with an id column (e.g. a cv run's label_review.csv, trimmed to the confirmed rows): "
                   "train ids to leave out; recorded in the manifest.")
@click.option("--seed", type=int, help="Fold-assignment seed  [default: 0]")
@click.option("--shard-size", type=int, help="Samples per WebDataset shard  [default: 5000]")
@click.option("--chunk-rows", type=int, help="Images per Zarr/HDF5 chunk  [default: 256]")
@click.option("--torchvision-names", is_flag=True, default=None,
              help="Also write OUT/pcam/camelyonpatch_level_2_split_{train,val,test}_{x,y}.h5 for "
                   "torchvision.datasets.PCAM (labelled splits only).")
@click.option("--keep-blank", is_flag=True, default=None, help="Keep all-black/all-white patches.")
@click.option("--image-size", type=click.IntRange(min=32),
              help="Height and width of the patches; others are rejected bad-shape  [default: 96]")
@click.option("--allow-empty", is_flag=True, default=None,
              help="Write the build even when it keeps no train image (or nothing of a split that had files).")
@click.option("--near-duplicates", is_flag=True, default=None,
              help="Also treat flipped/rotated copies (8 dihedral transforms) as duplicates; one more read pass.")
@click.option("--strict", is_flag=True, default=None, help="Exit with status 3 if anything was rejected.")
@click.option("--drop-flags", callback=_comma_list,
              help="Comma-separated QC flags whose images leave the labelled splits (listed in rejects.csv with the "
                   "flag as reason): centre-background, blurry, dark, overexposed  [default: none; every image is "
                   "measured and flagged in qc.csv]")
@click.option("--qc-centre-tissue", type=float,
              help="centre-background: tissue share of the 32x32 centre window below this  [default: 0.10]")
@click.option("--qc-blur", type=float,
              help="blurry: variance of the centre window's Laplacian below this (grey levels^2)  [default: 25]")
@click.option("--qc-dark", type=float, help="dark: 95th percentile grey level below this  [default: 60]")
@click.option("--qc-bright", type=float, help="overexposed: 5th percentile grey level above this  [default: 235]")
@click.option("--workers", type=click.IntRange(min=1), help="Local worker processes  [default: one per core]")
@click.option("--scheduler", help=SCHEDULER_HELP)
@click.option("--batch-size", type=int, help="Files per Dask task  [default: 2048]")
@click.option("--no-space-check", "space_check", flag_value=False, default=None,
              help="Start writing even when OUT's filesystem has less free space than the build needs.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Run spec TOML with a [build] table; flags override it.")
@friendly_errors
def build(config_file: Path | None, **flags: Any) -> None:
    """Decode, validate, de-duplicate and fold-assign patches, then write the datasets.

    Two source layouts (--layout, detected by default): the Kaggle competition folders
    (train/*.tif, test/*.tif, train_labels.csv; splits train and an unlabelled test), or the
    official PatchCamelyon files camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 with
    optional _meta.csv (splits train, valid, test, all labelled; folds grouped by wsi; ids are
    the sha1 of the pixels, equal to the Kaggle ids of the same patches).

    Writes to OUT: wds/*.tar (WebDataset shards, train by fold, other splits apart), pcam.zarr,
    pcam.h5, rejects.csv, duplicates.csv, qc.csv (centre-aware quality metrics and flags per
    image) and manifest.json (written last).

    \b
    Example:
      pcam-prep build --src data/sample/train --out shards/
      pcam-prep build --src pcam/ --out shards/ --torchvision-names
      pcam-prep build --config pipelines/kaggle.toml --formats wds --workers 8
      pcam-prep build --src train/ --out shards/ --drop-flags centre-background,blurry
    """
    from ..pipeline.config import build_config, load_toml
    from ..pipeline.run import build as run_build

    config = build_config(load_toml(config_file, "build") if config_file else {}, flags)
    bars = Bars("img", {"md5": "MiB"})
    summary = run_build(config, progress=bars)
    bars.close()
    click.echo(format_build_summary(summary.manifest, summary.seconds, summary.out, summary.reused))
    if config.strict and summary.manifest["rejects"]["count"]:
        raise click.exceptions.Exit(3)


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--sample", type=click.IntRange(min=1), help="Check N random samples per split instead of all.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --sample.")
@friendly_errors
def verify(out: Path, sample: int | None, seed: int) -> None:
    """Check a built folder against its manifest.

    Re-hashes every file, checks the counts, and checks that WebDataset, Zarr and HDF5
    decode to identical pixels, labels and ids (every sample unless --sample). Exits 1,
    naming the file and sample, on any mismatch.

    \b
    Example:
      pcam-prep verify shards/
      pcam-prep verify shards/ --sample 1000
    """
    from ..verify import verify as run_verify

    bars = Bars("step")
    report = run_verify(out, sample=sample, seed=seed, progress=bars)
    bars.close()
    for problem in report.problems:
        click.echo(f"FAIL {problem}", err=True)
    status = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    click.echo(f"{status}: {report.files} files hashed, {report.samples:,} samples compared across formats")
    if not report.ok:
        raise click.exceptions.Exit(1)


def format_build_summary(manifest: dict[str, Any], seconds: dict[str, float], out: Path,
                         reused: tuple[int, int] = (0, 0)) -> str:
    splits = manifest["splits"]
    total = seconds.get("total", 0.0)
    rate = sum(s["count"] for s in splits.values()) / total if total else 0.0
    lines = [f"built {out} in {total:.1f}s ({rate:,.0f} images/s)"]
    for name, split in splits.items():
        folds = f", {manifest['folds']['k']} folds" if name == "train" else ""
        labelled = f"  ({split['positives']:,} positive{folds})" if "positives" in split else ""
        lines.append(f"  {name:<7}{split['count']:>8,}{labelled}")
    lines += [
        f"  rejected {manifest['rejects']['count']:,}  {_counts(manifest['rejects']['by_reason'])}",
        f"  duplicates dropped {manifest['duplicates']['count']:,}  {_counts(manifest['duplicates']['by_kind'])}",
        *([f"  kept copies {manifest['duplicates']['kept_copies']:,}  (held-out images whose pixels repeat in "
           "their split: every id stays, see duplicates.csv)"] if manifest["duplicates"].get("kept_copies") else []),
        *(f"  {line}" for line in qc_lines(manifest.get("qc"))),
        "  mean " + _values(manifest["stats"]["mean"]) + "   std " + _values(manifest["stats"]["std"]),
        f"  files {len(manifest['files'])}: " + ", ".join(sorted({f['format'] for f in manifest['files']})),
    ]
    checked = manifest.get("source_files")
    if checked:
        status = Counter([f["status"] for f in checked["files"]])
        lines.append(f"  source MD5 {len(checked['files'])} files: {status.get('match', 0)} match the published "
                     f"checksums, {status.get('mismatch', 0)} do not, {status.get('unpublished', 0)} have none "
                     "(unpacked .h5: keep the .gz beside it to check it; manifest source_files)")
    mismatched = manifest.get("ids", {}).get("sha1_mismatch", 0)
    if mismatched:
        lines.append(f"  warning: {mismatched:,} ids are not the sha1 of their pixels (Kaggle ids are): renamed or "
                     "edited files? (manifest ids.sha1_mismatch)")
    if reused[0]:
        lines.append(f"  reused {reused[0]} of {reused[1]} shards from the earlier build (inputs unchanged); "
                     "every file was still decoded and checked, and Zarr/HDF5 were rewritten")
    return "\n".join(lines)


def _values(values: list[float] | None) -> str:
    return " ".join(f"{v:.4f}" for v in values) if values is not None else "- (no train images)"


def _counts(counts: dict[str, int]) -> str:
    return "(" + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ")" if counts else ""


# Commands that live in their own modules (they import Bars/friendly_errors from here).
from .cv import cv
from .map import map_
from .stats import stats
from .sweep import sweep
from .train import bench, predict, train

for command in (stats, train, predict, bench, sweep, cv, map_):
    main.add_command(command)
add_verbose_option(main)  # `pcam-prep build -v` works as well as `pcam-prep -v build`

if __name__ == "__main__":  # pragma: no cover
    main()
