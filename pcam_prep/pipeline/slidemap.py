"""`pcam-prep map`: which PCam row, split and slide (wsi) every Kaggle id comes from.

    kaggle  = kaggle_ids(path)                   Kaggle ids per split: file names (or a Kaggle build's ids)
    pcam    = pcam_rows(path, executor)          sha1 of every PCam row, in parallel blocks, with its wsi
    found   = match_slides(kaggle, pcam)         pure: frames in, frames and counts out
    write_map(out, found)                        groups.csv, kaggle_to_pcam.csv, summary.json

The match relies on Kaggle naming each file by the sha1 of its 96x96x3 uint8 pixels: Kaggle
ids are not decoded or re-hashed here. PCam test labels never reach the outputs: only Kaggle
train ids get rows, and no label is written at all.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import PcamPrepError, Refused
from ..files import write_csv_atomic, write_json_atomic
from ..manifest import read_manifest, safe_relpath
from ..readers import ArrayReader, ShardReader
from ..schema import HDF5_NAME, MANIFEST_NAME, PCAM_SPLITS, ZARR_NAME, SampleLayout, image_shape
from ..sources import kaggle, pcam_h5
from .executor import Executor, ProgressFn

logger = logging.getLogger(__name__)

GROUPS_NAME, TABLE_NAME, SUMMARY_NAME = "groups.csv", "kaggle_to_pcam.csv", "summary.json"
TABLE_COLUMNS = ["id", "kaggle_split", "pcam_split", "pcam_index", "wsi"]
UNMATCHED = "unmatched"
_PCAM_ORDER = {spec.name: rank for rank, spec in enumerate(PCAM_SPLITS)}
_KINDS = ("a Kaggle folder (train/, test/, train_labels.csv)", "a PCam folder (camelyonpatch_level_2_split_*)",
          "a built OUT (manifest.json)")


@dataclass(frozen=True)
class MapConfig:
    kaggle: Path  # Kaggle competition root (or its train/ folder), or an OUT built from one
    pcam: Path  # folder of the PCam camelyonpatch_level_2_split_*_{x,y}.h5 files and their _meta.csv
    out: Path  # gets groups.csv, kaggle_to_pcam.csv and summary.json
    overwrite: bool = False  # replace those files if OUT already holds them (default: refuse)
    batch_size: int = 2048  # PCam rows hashed per task (~57 MB at 96x96)
    workers: int | None = None  # local worker processes; default: one per core
    scheduler: str | None = None  # as for build: processes | threads | sync | local | tcp://...

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise PcamPrepError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.workers is not None and self.workers < 1:
            raise PcamPrepError(f"workers must be >= 1, got {self.workers!r}")


@dataclass(frozen=True)
class SlideMap:
    """What `match_slides` found; `summary` is the JSON-ready account of it."""

    groups: pd.DataFrame  # id, group: the wsi of every matched Kaggle train id
    table: pd.DataFrame  # TABLE_COLUMNS: one row per (Kaggle train id, matching PCam row); unmatched ids once
    summary: dict[str, Any]

    @property
    def matched(self) -> int:
        return sum(n for counts in self.summary["kaggle"].values() for split, n in counts.items() if split != UNMATCHED)


def match_slides(kaggle_ids: pd.DataFrame, pcam: pd.DataFrame) -> SlideMap:
    """Match Kaggle ids (id, kaggle_split) to PCam rows (digest, pcam_split, pcam_index, wsi) by pixel sha1.

    An id whose pixels occur in several PCam rows takes the first (train, valid, test; by row) as
    its group, is counted once, under that row's split, and lists every row in the table.
    """
    pcam = pcam.assign(rank=pcam["pcam_split"].map(_PCAM_ORDER)).sort_values(["rank", "pcam_index"], kind="stable")
    pairs = kaggle_ids.merge(pcam.drop(columns="rank"), how="left", left_on="id", right_on="digest", sort=False)
    pairs["pcam_index"] = pairs["pcam_index"].astype("Int64")
    first = pairs.drop_duplicates(["id", "kaggle_split"])
    train = pairs[pairs["kaggle_split"] == "train"].sort_values("id", kind="stable")
    matched_train = first[(first["kaggle_split"] == "train") & first["wsi"].notna()]  # no wsi: no group
    groups = matched_train[["id", "wsi"]].rename(columns={"wsi": "group"}).sort_values("id", ignore_index=True)
    rows = pairs.dropna(subset=["pcam_split"]).groupby(["id", "kaggle_split"])
    in_kaggle = pcam["digest"].isin(kaggle_ids["id"])
    summary = {
        "kaggle": {split: _split_counts(first.loc[first["kaggle_split"] == split, "pcam_split"])
                   for split in kaggle_ids["kaggle_split"].unique()},
        "kaggle_ids_in_several_pcam_rows": int((rows.size() > 1).sum()),
        "kaggle_ids_whose_pcam_rows_name_several_wsi": int((rows["wsi"].nunique() > 1).sum()),
        "pcam_rows": _by_split(pcam, np.ones(len(pcam), bool)),
        # PCam rows whose pixels repeat an earlier PCam row: Kaggle holds each patch once at most
        "pcam_rows_repeating_an_earlier_row": _by_split(pcam, pcam["digest"].duplicated().to_numpy()),
        # PCam rows whose pixels are in no Kaggle split at all (every copy of such a patch counts)
        "pcam_rows_in_no_kaggle_split": _by_split(pcam, ~in_kaggle.to_numpy()),
    }
    return SlideMap(groups, train[TABLE_COLUMNS].reset_index(drop=True), summary)


def _split_counts(pcam_split: pd.Series) -> dict[str, int]:
    counts = pcam_split.fillna(UNMATCHED).value_counts()
    order = [s for s in _PCAM_ORDER if s in counts.index] + [UNMATCHED]
    return {split: int(counts.get(split, 0)) for split in order}


def _by_split(pcam: pd.DataFrame, mask: np.ndarray) -> dict[str, int]:
    counts, present = pcam.loc[mask, "pcam_split"].value_counts(), set(pcam["pcam_split"].unique())
    return {split: int(counts.get(split, 0)) for split in _PCAM_ORDER if split in present}


def source_kind(path: Path) -> str:
    """pcam-h5, kaggle or built (a folder with a manifest); anything else is one error line."""
    path = Path(path)
    if not path.is_dir():
        raise PcamPrepError(f"{path} is not a folder: expected {', '.join(_KINDS[:2])} or {_KINDS[2]}")
    if (path / MANIFEST_NAME).is_file():
        return "built"
    if pcam_h5.is_pcam_dir(path):
        return "pcam-h5"
    if (path / "train").is_dir() or any(path.glob("*.tif")):
        return "kaggle"
    raise PcamPrepError(f"{path} is neither {', '.join(_KINDS[:2])} nor {_KINDS[2]}")


def slide_map(config: MapConfig, progress: ProgressFn | None = None) -> SlideMap:
    """Match `config.kaggle` to `config.pcam` and write the map into `config.out`; refuse before any work."""
    check_out(config.out, config.overwrite)
    workers = config.workers or os.cpu_count() or 1
    with Executor(config.scheduler, workers, progress, ("h5py",)) as executor:
        ids, origin = kaggle_ids(config.kaggle)
        pcam = pcam_rows(config.pcam, executor, config.batch_size)
    found = match_slides(ids, pcam)
    if not found.matched:
        raise PcamPrepError(f"no Kaggle id of {config.kaggle} matches a PCam row of {config.pcam} ({len(ids):,} ids, "
                            f"{len(pcam):,} rows): are these the same patches, and are the Kaggle ids the sha1 of "
                            "their pixels, as the competition's file names are?")
    summary = {"kaggle_ids_from": origin, **found.summary}
    found = SlideMap(found.groups, found.table, summary)
    write_map(config.out, found)
    return found


def check_out(out: Path, overwrite: bool) -> None:
    """Never replace an earlier map by accident (--overwrite replaces it)."""
    found = [name for name in (GROUPS_NAME, TABLE_NAME, SUMMARY_NAME) if (Path(out) / name).exists()]
    if found and not overwrite:
        raise Refused(f"{out} already holds a map ({', '.join(found)}): pass --overwrite to replace it, "
                      "or choose another --out")


def write_map(out: Path, found: SlideMap) -> None:
    """Each file under a temporary name, renamed into place; summary.json last."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out / GROUPS_NAME, ["id", "group"], found.groups.to_numpy(object).tolist())
    table = found.table.astype({"pcam_index": "string"}).fillna("")
    write_csv_atomic(out / TABLE_NAME, TABLE_COLUMNS, table.to_numpy(object).tolist())
    write_json_atomic(out / SUMMARY_NAME, found.summary)


def kaggle_ids(path: Path) -> tuple[pd.DataFrame, str]:
    """(id, kaggle_split) of every Kaggle train and test id, and where the ids came from (for the summary)."""
    kind = source_kind(path)
    if kind == "pcam-h5":
        raise PcamPrepError(f"--kaggle {path} holds PCam files (camelyonpatch_level_2_split_*): swapped with --pcam?")
    if kind == "built":
        manifest = read_manifest(path)
        if manifest.get("source_layout") != "kaggle":
            raise PcamPrepError(f"--kaggle {path} was built from {manifest.get('source_layout')} files, not from a "
                                "Kaggle folder")
        ids = built_ids(path, manifest)
        renamed = manifest.get("ids", {}).get("sha1_mismatch", 0)
        origin = (f"the ids the build in {path} kept (ids it rejected or dropped as duplicates are not in it)"
                  + (f"; {renamed:,} of them are not the sha1 of their pixels, so cannot match" if renamed else ""))
    else:
        ids = {split: listed_ids(folder, split) for split, folder in kaggle_folders(Path(path)).items()}
        origin = "file names: Kaggle names each file by the sha1 of its pixels, so ids are not decoded or re-hashed"
    frame = pd.concat([pd.DataFrame({"id": v, "kaggle_split": k}) for k, v in ids.items()], ignore_index=True)
    return frame, origin


def kaggle_folders(path: Path) -> dict[str, Path]:
    """train/ and (if present) test/ of a competition root, or of the train/ folder it was given."""
    train = path / "train" if (path / "train").is_dir() else path
    test = train.parent / "test"
    return {"train": train, **({"test": test} if test.is_dir() and test != train else {})}


def listed_ids(folder: Path, split: str) -> np.ndarray:
    """The ids (file stems) of a Kaggle folder's .tif files; nothing is opened."""
    frame, strays = kaggle.list_images(folder, folder.parent, split)
    if strays:
        logger.warning("%s: %d entries are not .tif files named by an id; not mapped", folder, len(strays))
    return frame["id"].to_numpy()


def built_ids(out: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """The ids of every split of a build, from its id column (HDF5 or Zarr) or, failing that, its shard headers."""
    formats = {entry["format"] for entry in manifest["files"]}
    for fmt, name in (("hdf5", HDF5_NAME), ("zarr", ZARR_NAME)):
        if fmt in formats:
            return {split: ArrayReader(out / name, fmt, split).column("id") for split in manifest["splits"]}
    shape = tuple(manifest["image_shape"])
    ids = {}
    for split, info in manifest["splits"].items():
        layout = SampleLayout(shape, info["labelled"])
        shards = [f for f in manifest["files"] if f["format"] == "wds" and f["split"] == split]
        ids[split] = np.array([i for f in shards for i in ShardReader(safe_relpath(out, f["path"]), layout,
                                                                       f["count"]).ids], dtype=object)
    return ids


def pcam_rows(path: Path, executor: Executor, batch_size: int) -> pd.DataFrame:
    """digest, pcam_split, pcam_index, wsi of every PCam row: the pixels hashed in parallel blocks of rows."""
    kind = source_kind(path)
    if kind != "pcam-h5":
        why = ("a build records no PCam row numbers or wsi" if kind == "built" else "it holds no "
               "camelyonpatch_level_2_split_*_x.h5 file (a Kaggle folder: swapped with --kaggle?)")
        raise PcamPrepError(f"--pcam {path} is not a PCam source folder: {why}; pass the folder of the PCam "
                            "camelyonpatch_level_2_split_* files and their _meta.csv")
    layout = pcam_h5.resolve_layout(path)
    no_meta = [split for split, files in layout.splits.items() if files.meta is None]
    if no_meta:
        raise PcamPrepError(f"--pcam {path}: {pcam_h5.pcam_file(no_meta[0], 'meta', 'csv')} not found; the map "
                            f"takes each row's slide from the meta CSV's {pcam_h5.META_GROUP!r} column")
    shape = image_shape()
    inventory = pcam_h5.scan(layout, shape)
    batches = [(split, frame.iloc[start : start + batch_size]) for split, frame in inventory.splits.items()
               for start in range(0, len(frame), batch_size)]
    calls = [inventory.reader.inspect_call(rows[["path", "row"]], shape, True, False) for _, rows in batches]
    reports = executor.map("hash", calls, [len(rows) for _, rows in batches])
    frames = [pd.DataFrame({"digest": report.digests, "pcam_split": split, "pcam_index": rows["row"].to_numpy(),
                            "wsi": rows["group"].to_numpy()}) for (split, rows), report in zip(batches, reports)]
    columns = {"digest": [], "pcam_split": [], "pcam_index": np.zeros(0, np.int64), "wsi": []}
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns)
