"""The report's QC page: the worst patches per quality flag, centre window outlined.

"Worst" is the metric that decided the flag: the least centre tissue, the flattest centre, the
darkest 95th percentile, the brightest 5th percentile. The patches come from qc.csv (a built
folder) or from the analysis (a raw folder), their pixels from the same blocks `stats` reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..figures import figure as _figure
from ..figures import patch_tile
from ..figures import save as _save
from ..qc import FLAGS

# flag -> (qc.csv column that decided it, True when a larger value is worse)
WORST_BY = {"centre-background": ("tissue_centre", False), "blurry": ("sharpness_centre", False),
            "dark": ("p95", False), "overexposed": ("p05", True)}
PER_FLAG = 8
CAPTION = ("Quality flags: the worst kept patches per flag (qc.csv), the cyan box is the 32x32 centre window "
           "that decides the label; the number under each patch is the metric that flagged it.")


def worst_flagged(qc: pd.DataFrame, per_flag: int = PER_FLAG) -> pd.DataFrame:
    """Rows to show: flag, id, split, row (index within its split, output order), label, value."""
    if qc.empty:
        return pd.DataFrame(columns=["flag", "id", "split", "row", "label", "value"])
    qc = qc.assign(row=qc.groupby("split", sort=False).cumcount())
    flags = qc["flags"].fillna("").astype(str)
    picked = []
    for flag, (column, larger_is_worse) in WORST_BY.items():
        hit = qc[flags.str.split(";").map(lambda names, f=flag: f in names)]
        hit = hit.sort_values(column, ascending=not larger_is_worse, kind="stable").head(per_flag)
        picked.append(pd.DataFrame({"flag": flag, "id": hit["id"], "split": hit["split"], "row": hit["row"],
                                    "label": hit.get("label", pd.NA),
                                    "value": hit[column].astype(float)}))
    return pd.concat(picked, ignore_index=True)


def plot_qc(shown: pd.DataFrame, images: np.ndarray, counts: dict[str, int], path: Path) -> Path:
    """One row per flag: its worst patches (or a note that no patch has it)."""
    fig = _figure(PER_FLAG * 1.3, len(FLAGS) * 1.75 + 0.3)
    axes = fig.subplots(len(FLAGS), PER_FLAG, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for r, flag in enumerate(FLAGS):
        rows = np.flatnonzero(shown["flag"].to_numpy() == flag)
        column = WORST_BY[flag][0]
        axes[r, 0].set_title(f"{flag}: {counts.get(flag, 0):,} kept patches", fontsize=8, loc="left",
                             fontweight="bold")
        if not len(rows):
            axes[r, 0].text(0, 0.5, "none", fontsize=8, color="0.4")
        for ax, i in zip(axes[r], rows):
            row = shown.iloc[i]
            patch_tile(ax, images[i], frame=False)
            label = "" if pd.isna(row["label"]) else f" y={int(row['label'])}"
            ax.set_xlabel(f"{column} {row['value']:.3g}\n{row['split']}{label} {row['id'][:8]}", fontsize=6)
    return _save(fig, path)
