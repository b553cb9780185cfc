"""`stats --report DIR --run RUN` for a `pcam-prep cv` run: per-fold and pooled ROC, the fold table with the
CI, and a gallery of the most suspect labels (given label, OOF probability, centre window outlined)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..figures import figure as _figure
from ..figures import patch_tile
from ..figures import save as _save

CV_CAPTIONS = {
    "cv_roc": "Out-of-fold ROC: each fold scored by the model that did not train on it, and all folds pooled.",
    "cv_suspects": "The most suspect labels (confident learning on the OOF probabilities): given label, OOF "
                   "probability of tumour, rank; the box is the centre window that decides the label.",
}


def is_cv_run(run: Path) -> bool:
    return (Path(run) / "cv.json").is_file()


def add_cv_run(run: Path, out: Path, target: Path, kind: str, limit: int = 16) -> tuple[list[Path], list[str], str]:
    """(figures, notes, html of the fold table) for a cv run folder."""
    summary = json.loads((run / "cv.json").read_text())
    oof = pd.read_csv(run / "oof.csv", dtype={"id": str})
    figures = [plot_cv_roc(oof, out / "cv_roc.png")]
    notes = [] if summary["grouped"] else [f"Warning: {summary['warning']}."]
    review = pd.read_csv(run / "label_review.csv", dtype={"id": str}).head(limit)
    if review.empty:
        notes.append("No suspect labels in label_review.csv.")
    elif kind != "built":
        notes.append("Suspect gallery skipped: pass the built folder the cv run trained on as TARGET.")
    else:
        figures.append(plot_suspects(review, suspect_images(target, review["id"]), out / "cv_suspects.png"))
    return figures, notes, fold_table(summary)


def plot_cv_roc(oof: pd.DataFrame, path: Path) -> Path:
    from ..train.metrics import roc_auc, roc_curve

    fig = _figure(4.6, 4.4)
    ax = fig.subplots()
    for fold, part in oof.groupby("fold"):
        fpr, tpr = roc_curve(part["label"].to_numpy(), part["prob"].to_numpy())
        ax.plot(fpr, tpr, lw=1, alpha=0.7, label=f"fold {fold}: AUC {roc_auc(part['label'], part['prob']):.4f}")
    fpr, tpr = roc_curve(oof["label"].to_numpy(), oof["prob"].to_numpy())
    ax.plot(fpr, tpr, lw=2.2, color="black", label=f"pooled OOF: AUC {roc_auc(oof['label'], oof['prob']):.4f}")
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1)
    ax.set(title="out-of-fold ROC", xlabel="false positive rate", ylabel="true positive rate", aspect="equal")
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def suspect_images(target: Path, ids: pd.Series) -> list[np.ndarray | None]:
    """Pixels of each id from the built train split (None for an id the build no longer has)."""
    from ..loader import open_source

    source = open_source(target, "train", None, _fastest_format(target))
    row_of = {sample_id: row for row, sample_id in enumerate(source.ids)}
    return [source.take(np.array([row_of[i]]))[0] if i in row_of else None for i in ids]


def _fastest_format(target: Path) -> str:
    built = {f["format"] for f in json.loads((target / "manifest.json").read_text())["files"]}
    return next(fmt for fmt in ("wds", "hdf5", "zarr") if fmt in built)


def plot_suspects(review: pd.DataFrame, images: list[np.ndarray | None], path: Path, per_row: int = 8) -> Path:
    rows = -(-len(review) // per_row)
    fig = _figure(per_row * 1.35, rows * 1.75 + 0.3)
    fig.suptitle(f"top {len(review)} suspect labels", fontsize=10)
    axes = fig.subplots(rows, per_row, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, row, image in zip(axes, review.itertuples(), images):
        ax.set_title(f"#{row.rank} given {row.label}\nOOF p={row.prob:.2f}", fontsize=7,
                     color="tab:red" if row.label == 1 else "tab:blue")
        if image is None:
            continue
        patch_tile(ax, image, frame=False)
    return _save(fig, path)


def fold_table(summary: dict[str, Any]) -> str:
    """The cv.json figures as an html table: one row per fold, then pooled with its CI."""
    esc = html.escape
    head = "<tr><th>fold</th><th>images</th><th>AUC</th><th>best epoch</th><th>images/s</th><th>data wait</th></tr>"
    rows = "".join(f"<tr><td>{f['fold']}</td><td>{f['images']:,}</td><td>{f['auc']:.4f}</td><td>{f['best_epoch']}"
                   f"</td><td>{f['images_per_s'] or 0:,.0f}</td><td>{100 * (f['data_wait_frac'] or 0):.1f}%</td></tr>"
                   for f in summary["folds"])
    ci = summary["ci95"]
    grouping = f"grouped by {summary['group_by']}" if summary["grouped"] else "stratified only, not grouped"
    return (f"<h2>Cross-validation ({len(summary['folds'])} folds, {esc(grouping)})</h2>\n<table>{head}{rows}</table>\n"
            f"<p>pooled OOF AUC <b>{summary['pooled_oof_auc']:.4f}</b> (95% CI {ci['low']:.4f}-{ci['high']:.4f}, "
            f"{ci['resamples']:,} stratified bootstrap resamples); mean &plusmn; std over folds "
            f"{summary['mean_fold_auc']:.4f} &plusmn; {summary['std_fold_auc']:.4f}; {summary['suspects']:,} suspect "
            f"labels in label_review.csv</p>\n")
