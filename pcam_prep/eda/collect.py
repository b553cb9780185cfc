"""`pcam-prep stats`: what a dataset holds, from a built OUT folder or straight from the tifs.

    found    = built(out) | raw(src)            counts, folds, moments, rejects, duplicates
    blocks   = row ranges of ~2048 images       a store path + rows, a shard, or tif paths
    tallies  = tally_block(blocks)  [parallel]  per-image HSV saturation, pixel histograms
    eda      = summarise(found, tallies)        one JSON-ready dict + arrays for the report

Counts, folds and mean/std are never recomputed: a built folder's come from its manifest, a
raw folder's from `pipeline.analyse` + `pipeline.describe`, the code a build runs, so the two
agree exactly. Background rule: PCam dropped patches whose HSV saturation was below 0.07;
here a patch is background when the mean of its per-pixel saturation (max-min)/max is < 0.07.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import PcamPrepError
from ..manifest import read_manifest, safe_relpath
from ..pipeline.analyse import analyse
from ..pipeline.card import describe
from ..pipeline.config import BuildConfig
from ..pipeline.executor import Executor, ProgressFn
from ..pipeline.qcflags import qc_table
from ..readers import ArrayReader, ShardReader
from ..schema import (
    BACKGROUND_SATURATION,
    DUPLICATES_NAME,
    HDF5_NAME,
    MANIFEST_NAME,
    QC_NAME,
    REJECTS_NAME,
    ZARR_NAME,
    SampleLayout,
)
from ..sources.base import stamps_of
from ..sources.kaggle import KaggleLayout, resolve_layout
from ..sources.validate import load_images
from .qc_page import worst_flagged
from .stain_stats import SplitStain, collect_stain

logger = logging.getLogger(__name__)

BACKGROUND_RULE = "mean per-pixel HSV saturation (max-min)/max < 0.07 (PCam's background threshold)"
BLOCK_ROWS = 2048  # images per Dask task: amortises the task cost, ~56 MB of pixels at most
_STEP = 256  # images per vectorised step inside a task: keeps each worker at ~10 MB


@dataclass(frozen=True)
class EdaOptions:
    workers: int | None = None  # parallel workers; default: one per core
    scheduler: str | None = None  # threads | processes | sync | tcp:// address (see Executor)
    samples_per_label: int = 0  # train patches to pick per label for the report grid (0: none)
    seed: int = 0  # which patches the grid shows (and which the stain statistics sample)
    stain_sample: int = 256  # patches per split the stain statistics sample (0: none)


@dataclass(frozen=True)
class Block:
    """One task's images, addressed by path so it pickles cheaply: never an open handle."""

    kind: str  # zarr | hdf5 | wds | files
    path: str  # store or shard path ("" for files)
    split: str
    labelled: bool
    shape: tuple[int, int, int]
    start: int = 0  # rows [start, stop) of the store or shard
    stop: int = 0
    count: int = 0  # kind == wds: samples in the shard
    files: tuple[str, ...] = ()  # kind == files: the tifs, their (size, mtime_ns) and labels
    stamps: tuple[tuple[int, int], ...] = ()
    labels: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.files) if self.kind == "files" else self.stop - self.start


@dataclass(frozen=True)
class Tally:
    """Pixel facts about one block."""

    labels: np.ndarray | None  # (N,) uint8, labelled splits only
    saturation: np.ndarray  # (N,) float64 mean HSV saturation per image
    hist: np.ndarray  # (G, 3, 256) int64 pixel counts: G = 2 labels for a labelled split, 1 group otherwise


@dataclass(frozen=True)
class Eda:
    summary: dict[str, Any]  # what `stats --json` prints
    hist: dict[str, np.ndarray]  # split -> (G, 3, 256) pixel counts: by label (G = 2) or all (G = 1)
    saturation: dict[str, np.ndarray]  # split -> per-image mean saturation, in output row order
    labels: dict[str, np.ndarray]  # labelled split -> labels, same order
    samples: dict[int, np.ndarray]  # label -> (n, H, W, 3) train patches for the grid
    rejects: pd.DataFrame  # id, path (relative to the source root), reason, detail
    duplicates: pd.DataFrame  # kept, dropped, kind
    sources: KaggleLayout | None  # where the source tifs are, if they can still be found
    note: str = ""  # why `sources` is None
    qc: pd.DataFrame = field(default_factory=pd.DataFrame)  # qc.csv: per image metrics and flags (empty: none)
    qc_shown: pd.DataFrame = field(default_factory=pd.DataFrame)  # the worst flagged rows (eda.qc_page)
    qc_images: np.ndarray = field(default_factory=lambda: np.zeros((0, 96, 96, 3), np.uint8))  # their pixels
    stain: dict[str, SplitStain] = field(default_factory=dict)  # split -> per-patch stain arrays for the figure


@dataclass(frozen=True)
class _Found:
    manifest: dict[str, Any]
    source: str
    blocks: list[Block]  # split by split in the manifest's order, rows in output order
    rejects: pd.DataFrame
    duplicates: pd.DataFrame
    sources: KaggleLayout | None
    note: str = ""
    qc: pd.DataFrame = field(default_factory=pd.DataFrame)


def collect(target: Path, options: EdaOptions = EdaOptions(), progress: ProgressFn | None = None) -> Eda:
    """Everything `stats` prints and `--report` draws, for a built or a raw folder."""
    target = Path(target)
    built = target_kind(target) == "built"
    workers = options.workers or os.cpu_count() or 1
    with Executor(options.scheduler, workers, progress) as executor:
        found = find_built(target) if built else find_raw(target, executor, options)
        tallies = executor.map("pixels", [(tally_block, (b,)) for b in found.blocks], [len(b) for b in found.blocks])
    hist, saturation, labels = {}, {}, {}
    for split, info in found.manifest["splits"].items():
        mine = [t for b, t in zip(found.blocks, tallies) if b.split == split]
        groups = 2 if info["labelled"] else 1
        hist[split] = sum((t.hist for t in mine), np.zeros((groups, 3, 256), np.int64))
        saturation[split] = _concat([t.saturation for t in mine])
        if info["labelled"]:
            labels[split] = np.concatenate([t.labels for t in mine]) if mine else np.zeros(0, np.uint8)
    train = labels.get("train", np.zeros(0, np.uint8))
    rows = choose_rows(train, options.samples_per_label, options.seed)
    train_blocks = [b for b in found.blocks if b.split == "train"]
    samples = {label: read_rows(train_blocks, picked) for label, picked in rows.items()}
    shown = worst_flagged(found.qc)
    qc_images = read_split_rows(found.blocks, shown["split"].to_numpy(), shown["row"].to_numpy())
    summary = summarise(found.manifest, saturation, labels)
    stain, stain_arrays = collect_stain(found.manifest, found.blocks, read_rows, options.stain_sample, options.seed)
    summary = {"target": str(target.resolve()), "kind": "built" if built else "raw", "source": found.source, **summary,
               "stain": stain}
    return Eda(summary, hist, saturation, labels, samples, found.rejects, found.duplicates, found.sources, found.note,
               found.qc, shown, qc_images, stain_arrays)


def target_kind(target: Path) -> str:
    """'built' (has a manifest) or 'raw' (Kaggle root, or its train/ folder beside train_labels.csv)."""
    if not target.is_dir():
        raise PcamPrepError(f"{target} is not a folder")
    if (target / MANIFEST_NAME).is_file():
        return "built"
    if (target / "train").is_dir() or (target.parent / "train_labels.csv").is_file():
        return "raw"
    raise PcamPrepError(f"{target} is neither a built folder (no {MANIFEST_NAME}) nor a Kaggle-layout folder "
                        f"(no train/ inside it, no train_labels.csv beside it)")


def find_built(out: Path) -> _Found:
    """Blocks over the fastest store the build wrote (zarr, then hdf5, then wds shards), every split."""
    manifest = read_manifest(out)
    shape = tuple(manifest["image_shape"])
    formats = {f["format"] for f in manifest["files"]}
    source = next((f for f in ("zarr", "hdf5", "wds") if f in formats), None)
    if source is None:
        raise PcamPrepError(f"{out}: the manifest lists no zarr, hdf5 or wds output to read pixels from")
    blocks = []
    for split, info in manifest["splits"].items():
        labelled = bool(info["labelled"])
        if source == "wds":
            shards = [f for f in manifest["files"] if f["format"] == "wds" and f["split"] == split]
            for entry in sorted(shards, key=lambda f: (f["fold"] or 0, f["path"])):  # f10 after f9
                path, count = str(safe_relpath(out, entry["path"])), entry["count"]
                blocks += [Block("wds", path, split, labelled, shape, s, min(s + BLOCK_ROWS, count), count)
                           for s in range(0, count, BLOCK_ROWS)]
        else:
            store, count = str(out / (ZARR_NAME if source == "zarr" else HDF5_NAME)), info["count"]
            blocks += [Block(source, store, split, labelled, shape, s, min(s + BLOCK_ROWS, count))
                       for s in range(0, count, BLOCK_ROWS)]
    rejects, duplicates = (_read_table(out / name) for name in (REJECTS_NAME, DUPLICATES_NAME))
    sources, note = _recorded_sources(manifest.get("config", {}))
    qc_path = out / QC_NAME  # builds before QC have none
    qc = pd.read_csv(qc_path, dtype={"id": str, "split": str, "flags": str}) if qc_path.is_file() else pd.DataFrame()
    return _Found(manifest, source, blocks, rejects, duplicates, sources, note, qc)


def find_raw(src: Path, executor: Executor, options: EdaOptions) -> _Found:
    """Decode, validate, dedup and fold-assign exactly as `build` would (default settings)."""
    # analyse() never touches `out`; BuildConfig just requires one.
    config = BuildConfig(src=src, out=src, workers=options.workers, scheduler=options.scheduler)
    found = analyse(config, executor)
    manifest = describe(config, found, [])
    blocks = []
    for split, info in manifest["splits"].items():
        frame, labelled = found.splits[split], bool(info["labelled"])
        labels = frame["label"].astype(int).tolist() if labelled else []
        for start in range(0, len(frame), BLOCK_ROWS):
            rows = slice(start, start + BLOCK_ROWS)
            blocks.append(Block("files", "", split, labelled, found.shape, files=tuple(frame["path"].iloc[rows]),
                                stamps=tuple(stamps_of(frame.iloc[rows])), labels=tuple(labels[rows])))
    layout = resolve_layout(src)
    qc = qc_table(found.splits, found.specs, config.thresholds)
    return _Found(manifest, "tif", blocks, found.rejects, found.dedup.duplicates, layout, "", qc)


def _read_table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False) if path.is_file() else pd.DataFrame()


def _recorded_sources(config: dict[str, Any]) -> tuple[KaggleLayout | None, str]:
    src = config.get("src")
    if not src:
        return None, "the manifest records no source folder"
    try:
        return resolve_layout(Path(src), config.get("labels"), config.get("test"), config.get("no_test", False)), ""
    except PcamPrepError as exc:
        return None, f"source files not found ({exc})"


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0)


def block_reader(block: Block) -> Callable[[int, int], tuple[np.ndarray, np.ndarray | None]]:
    """read(start, stop) -> images (and labels, for a labelled split) of rows [start, stop) of `block`.

    Built stores are read through `readers`, the one checked reader per format, opened once here.
    """
    if block.kind == "files":
        def read_files(start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
            images = load_images(list(block.files[start:stop]), list(block.stamps[start:stop]), block.shape)
            return images, np.asarray(block.labels[start:stop], np.uint8) if block.labelled else None
        return read_files
    if block.kind == "wds":
        shard = ShardReader(Path(block.path), SampleLayout(block.shape, block.labelled), block.count, mapped=False)

        def read_shard(start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
            lo, hi = block.start + start, block.start + stop
            return shard.read(lo, hi, np.empty((hi - lo, *block.shape), np.uint8))
        return read_shard
    store = ArrayReader(Path(block.path), block.kind, block.split, mapped=False)

    def read_store(start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        lo, hi = block.start + start, block.start + stop
        return store.range(lo, hi), store.column("y", lo, hi) if block.labelled else None
    return read_store


def tally_block(block: Block) -> Tally:
    """Saturation per image and pixel histograms of one block, a few hundred images at a time."""
    groups = 2 if block.labelled else 1
    hist = np.zeros((groups, 3, 256), np.int64)
    saturation, labels = [], []
    read = block_reader(block)
    for start in range(0, len(block), _STEP):
        images, y = read(start, min(start + _STEP, len(block)))
        saturation.append(mean_saturation(images))
        hist += channel_histograms(images, y if y is not None else np.zeros(len(images), np.uint8), groups)
        labels.append(y)
    return Tally(np.concatenate(labels) if groups == 2 and labels else None, _concat(saturation), hist)


def mean_saturation(images: np.ndarray) -> np.ndarray:
    """(N,) mean over pixels of HSV saturation (max-min)/max, 0 where max == 0."""
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    hi = np.maximum(np.maximum(r, g), b).astype(np.float32)
    lo = np.minimum(np.minimum(r, g), b)
    sat = np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)
    return sat.reshape(len(images), -1).mean(axis=1, dtype=np.float64)


def channel_histograms(images: np.ndarray, labels: np.ndarray, groups: int) -> np.ndarray:
    """(groups, C, 256) pixel-value counts per label and channel."""
    hist = np.zeros((groups, images.shape[-1], 256), np.int64)
    for group in range(groups):
        chosen = images[labels == group]
        for c in range(images.shape[-1]):
            hist[group, c] = np.bincount(chosen[..., c].ravel(), minlength=256)
    return hist


def choose_rows(labels: np.ndarray, per_label: int, seed: int) -> dict[int, np.ndarray]:
    """Up to `per_label` sorted train rows of each label, the same for the same seed."""
    if per_label < 0:
        raise ValueError(f"per_label must be >= 0, got {per_label!r}")
    if not per_label:
        return {}
    rng = np.random.default_rng(seed)
    rows = {}
    for label in (0, 1):
        pool = np.flatnonzero(labels == label)
        rows[label] = np.sort(rng.choice(pool, size=min(per_label, len(pool)), replace=False))
    return rows


def read_rows(blocks: list[Block], rows: np.ndarray) -> np.ndarray:
    """Images at global `rows` of consecutive `blocks` (a few patches for the report)."""
    if not blocks:
        return np.zeros((0, 96, 96, 3), np.uint8)
    ends = np.cumsum([len(b) for b in blocks])
    images = np.empty((len(rows), *blocks[0].shape), np.uint8)
    which = np.searchsorted(ends, rows, side="right")
    for k in np.unique(which).tolist():  # one reader per block, not one per row (the stain sample reads hundreds)
        read, picked = block_reader(blocks[k]), np.flatnonzero(which == k)
        local = rows[picked] - (int(ends[k - 1]) if k else 0)
        lo, hi = int(local.min()), int(local.max()) + 1
        if hi - lo <= 16 * len(picked):  # dense: one range read beats a chunk decode per row
            images[picked] = read(lo, hi)[0][local - lo]
            continue
        for i, row in zip(picked.tolist(), local.tolist()):
            images[i] = read(row, row + 1)[0][0]
    return images


def read_split_rows(blocks: list[Block], splits: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Images at `rows[i]` of split `splits[i]` (rows count within their split, in output order)."""
    shape = blocks[0].shape if blocks else (96, 96, 3)
    images = np.empty((len(rows), *shape), np.uint8)
    for split in dict.fromkeys(splits.tolist()):
        mine = splits == split
        images[mine] = read_rows([b for b in blocks if b.split == split], rows[mine])
    return images


def summarise(manifest: dict[str, Any], saturation: dict[str, np.ndarray],
              labels: dict[str, np.ndarray]) -> dict[str, Any]:
    """The stats object: manifest facts copied as they are, plus shares and the background pass per split."""
    splits = {name: dict(part) for name, part in manifest["splits"].items()}
    for part in splits.values():
        if part["labelled"]:
            part["positive_share"] = _share(part["positives"], part["count"])
    folds = dict(manifest["folds"])
    folds["counts"] = [{**f, "positive_share": _share(f["positives"], f["count"])} for f in folds["counts"]]
    background: dict[str, Any] = {"rule": BACKGROUND_RULE, "threshold": BACKGROUND_SATURATION}
    for split, values in saturation.items():
        background[split] = _background(values)
        if split in labels:
            background[split]["by_label"] = {str(k): _background(values[labels[split] == k]) for k in (0, 1)}
    return {
        "image_shape": manifest["image_shape"],
        "splits": splits,
        "folds": folds,
        "stats": {k: manifest["stats"][k] for k in ("mean", "std", "scale", "images")},
        "rejects": manifest["rejects"],
        "duplicates": manifest["duplicates"],
        "ids": manifest.get("ids", {"sha1_mismatch": 0}),
        "qc": manifest.get("qc"),
        "background": background,
    }


def _background(saturation: np.ndarray) -> dict[str, Any]:
    count = int((saturation < BACKGROUND_SATURATION).sum())
    return {"images": len(saturation), "background": count, "share": _share(count, len(saturation))}


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None
