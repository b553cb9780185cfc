"""Quality flags on the kept images (`qc`), and `build --drop-flags`: who leaves, and the manifest's record.

Every kept image carries the inspect pass's metrics (columns `qc.COLUMNS`). Flags follow from
BuildConfig's thresholds. Nothing is dropped by default; `--drop-flags` removes flagged images
from the labelled splits (train's pixels leave its moments like dedup's drops) and lists them in
rejects.csv with the flag as reason. An unlabelled split (Kaggle test) keeps every image: the
submission needs a prediction for each id, so its flags are only reported.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..qc import COLUMNS, FLAGS, Thresholds, flag_masks, flag_names
from ..schema import SplitSpec
from ..sources.base import REJECT_COLUMNS, RowReader
from .dedup import Dedup

# How each flag's reject detail reads: the metric that decided it, and its threshold.
_DETAIL = {
    "centre-background": ("tissue_centre", "centre_tissue", "<"),
    "blurry": ("sharpness_centre", "blur", "<"),
    "dark": ("p95", "dark", "<"),
    "overexposed": ("p05", "bright", ">"),
}


def flags_of(frame: pd.DataFrame, thresholds: Thresholds) -> dict[str, np.ndarray]:
    """Flag -> (N,) bool for the rows of a kept-split frame."""
    return flag_masks(frame[list(COLUMNS)].to_numpy(np.float64), thresholds)


def apply_drop_flags(result: Dedup, specs: tuple[SplitSpec, ...], flags: tuple[str, ...], thresholds: Thresholds,
                     reader: RowReader, root: Path) -> tuple[Dedup, pd.DataFrame]:
    """`result` without the labelled splits' images that carry any of `flags`, and their reject rows."""
    if not flags:
        return result, pd.DataFrame(columns=REJECT_COLUMNS)
    kept, dropped, rejects = dict(result.kept), [result.dropped], []
    for spec in (s for s in specs if s.labelled):
        frame = kept[spec.name]
        masks = flags_of(frame, thresholds)
        reason = np.full(len(frame), "", object)
        for flag in reversed([f for f in FLAGS if f in flags]):  # the first flag in FLAGS order names the reject
            reason[masks[flag]] = flag
        drop = reason != ""
        if not drop.any():
            continue
        gone = frame[drop]
        rejects.append(pd.DataFrame({"id": gone["id"].to_numpy(), "path": reader.locate(gone, root),
                                     "reason": reason[drop], "detail": _details(gone, reason[drop], thresholds),
                                     "split": spec.name}))
        kept[spec.name] = frame[~drop]
        if spec.name == "train":
            dropped.append(gone)
    rejects_frame = pd.concat(rejects, ignore_index=True) if rejects else pd.DataFrame(columns=REJECT_COLUMNS)
    return dataclasses.replace(result, kept=kept, dropped=pd.concat(dropped, ignore_index=True)), rejects_frame


def _details(rows: pd.DataFrame, reasons: np.ndarray, thresholds: Thresholds) -> list[str]:
    out = []
    for (_, row), reason in zip(rows.iterrows(), reasons):
        metric, limit, op = _DETAIL[reason]
        out.append(f"{metric} {row[metric]:.4g} {op} {getattr(thresholds, limit):g}")
    return out


def qc_table(splits: dict[str, pd.DataFrame], specs: tuple[SplitSpec, ...], thresholds: Thresholds) -> pd.DataFrame:
    """qc.csv: every image of the build, split by split in output order, with its metrics and flags."""
    parts = []
    for spec in specs:
        frame = splits[spec.name]
        part = pd.DataFrame({"id": frame["id"].to_numpy(), "split": spec.name})
        if spec.labelled:
            part["label"] = frame["label"].to_numpy()
        for column in COLUMNS:
            part[column] = frame[column].to_numpy()
        part["flags"] = flag_names(flags_of(frame, thresholds)) if len(frame) else []
        parts.append(part)
    table = pd.concat(parts, ignore_index=True)
    if "label" in table:
        table["label"] = table["label"].astype("Int8")  # empty for unlabelled splits, never 0.0
    return table.round({"tissue": 4, "tissue_centre": 4, "sharpness": 2, "sharpness_centre": 2}).astype(
        {"p05": "int16", "p95": "int16"})


def qc_record(splits: dict[str, pd.DataFrame], specs: tuple[SplitSpec, ...], thresholds: Thresholds,
              drop: tuple[str, ...], dropped: pd.DataFrame) -> dict[str, Any]:
    """The manifest's `qc`: thresholds, per flag the kept images flagged per split (and label), what was dropped."""
    counts: dict[str, dict[str, Any]] = {flag: {} for flag in FLAGS}
    for spec in specs:
        frame = splits[spec.name]
        masks = flags_of(frame, thresholds)
        for flag, mask in masks.items():
            entry: dict[str, Any] = {"count": int(mask.sum())}
            if spec.labelled:
                labels = frame["label"].to_numpy()
                entry["by_label"] = {str(k): int((mask & (labels == k)).sum()) for k in (0, 1)}
            counts[flag][spec.name] = entry
    by_reason = dropped.groupby(["reason", "split"]).size() if len(dropped) else pd.Series(dtype=int)
    return {
        "columns": list(COLUMNS),
        "thresholds": dataclasses.asdict(thresholds),
        "flags": {flag: {"rule": FLAGS[flag], "kept": counts[flag]} for flag in FLAGS},
        "dropped": {"flags": list(drop), "count": len(dropped),
                    "by_flag": {f"{reason}/{split}": int(n) for (reason, split), n in by_reason.items()}},
    }
