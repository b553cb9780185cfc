"""`pcam-prep stats --report DIR`: PNG figures and an index.html that shows them.

Figures come from `figures` (matplotlib's object API, no pyplot); the run figures are the
trainer's own (`train.plots`), re-drawn from the run's data when its PNGs are missing.
"""

from __future__ import annotations

import html
import json
import logging
import shutil
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..figures import figure as _figure
from ..figures import patch_tile, tile_axes
from ..figures import save as _save
from ..pipeline.dedup import is_kept_kind
from ..sources.decode import Reject, read_file
from ..sources.kaggle import KaggleLayout
from ..sources.validate import decoder_for
from .collect import Eda
from .cv_report import CV_CAPTIONS, add_cv_run, is_cv_run
from .qc_page import CAPTION as QC_CAPTION
from .qc_page import plot_qc
from .stain_stats import STAIN_CAPTIONS, plot_stain

logger = logging.getLogger(__name__)

COLOURS = {0: "tab:blue", 1: "tab:red"}
LABEL_NAMES = {0: "label 0: no tumour in the centre", 1: "label 1: tumour in the centre"}
RUN_FIGURES = ("curves", "roc", "confusion")
_PER_ROW = 8


CAPTIONS = {
    "samples": "Random train patches per label; the box is the 32x32 centre window that decides the label.",
    "label_balance": "Train label balance overall and per fold; folds are stratified, so their shares should match.",
    "intensity_histograms": "Per-channel pixel intensity distributions: train label 0 vs label 1, other splits dashed.",
    "background_saturation": "Mean HSV saturation per patch; patches left of the dashed line count as background.",
    "duplicates": "Duplicates: the kept file beside each dropped copy, a few of each kind.",
    "rejects": "Rejected files, a couple per reason; files that cannot be decoded show the reason instead.",
    "qc_flags": QC_CAPTION,
    "run_curves": "Training curves: loss, validation AUC and accuracy per epoch.",
    "run_roc": "Validation ROC curve.",
    "run_confusion": "Validation confusion matrix.",
    "run_sweep": "Sweep: each trial's best validation AUC against each searched parameter (blue complete, orange "
                 "pruned), and the parameter importances Optuna computed.",
    **CV_CAPTIONS,
    **STAIN_CAPTIONS,
}


def write_report(eda: Eda, out: Path, run: Path | None = None) -> Path:
    """Write figures and `index.html` into `out`; return the html path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in CAPTIONS:  # a figure left from an earlier report would not be linked: remove it
        (out / f"{name}.png").unlink(missing_ok=True)
    figures = [plot_samples(eda.samples, out / "samples.png")] if eda.samples else []
    figures += [plot_balance(eda.summary, out / "label_balance.png"),
                plot_histograms(eda.hist, out / "intensity_histograms.png"),
                plot_saturation(eda, out / "background_saturation.png")]
    figures += [plot_stain(eda.summary["stain"], eda.stain, out / "stain.png")] if eda.stain else []
    galleries, notes = gallery_figures(eda, out)
    figures += galleries
    if eda.qc.empty:
        notes.append("No QC page: this build has no qc.csv (built before QC metrics existed).")
    else:
        counts = {flag: sum(c["count"] for c in entry["kept"].values())
                  for flag, entry in (eda.summary.get("qc") or {}).get("flags", {}).items()}
        figures.append(plot_qc(eda.qc_shown, eda.qc_images, counts, out / "qc_flags.png"))
    extra = ""
    if run is not None and is_cv_run(Path(run)):
        cv_figures, cv_notes, extra = add_cv_run(Path(run), out, Path(eda.summary["target"]), eda.summary["kind"])
        figures += cv_figures
        notes += [f"Cross-validation figures from {run}."] + cv_notes
    elif run is not None:
        run_figures, run_notes = add_run(Path(run), out)
        figures += run_figures
        notes += [f"Run figures from {run}."] + run_notes
    index = out / "index.html"
    index.write_text(render_html(eda.summary, [(p.name, CAPTIONS[p.stem]) for p in figures], notes, extra))
    logger.info("wrote %d figures and %s", len(figures), index)
    return index


def gallery_figures(eda: Eda, out: Path) -> tuple[list[Path], list[str]]:
    """Duplicates and rejects from the source tifs, when there are any and the sources are still there."""
    figures, notes = [], []
    shape = tuple(eda.summary["image_shape"])
    for name, frame, plot in (("duplicates", eda.duplicates, plot_duplicates), ("rejects", eda.rejects, plot_rejects)):
        if frame.empty:
            notes.append(f"No {name}.")
        elif eda.sources is None:
            notes.append(f"{len(frame)} {name} not shown: {eda.note}.")
        else:
            figures.append(plot(frame, eda.sources, shape, out / f"{name}.png"))
    return figures, notes


def plot_samples(samples: dict[int, np.ndarray], path: Path) -> Path:
    """Rows of patches per label, each with the PCam centre window outlined."""
    rows = {label: max(1, -(-len(images) // _PER_ROW)) for label, images in samples.items()}
    fig = _figure(_PER_ROW * 1.25, sum(rows.values()) * 1.3 + 0.5 * len(rows))
    parts = fig.subfigures(len(samples), 1, height_ratios=list(rows.values()))
    for part, (label, images) in zip(np.atleast_1d(parts), samples.items()):
        part.suptitle(f"{LABEL_NAMES[label]} ({len(images)} shown)", color=COLOURS[label], fontweight="bold")
        axes = np.atleast_1d(part.subplots(rows[label], _PER_ROW)).ravel()
        for ax in axes[len(images):]:
            ax.set_axis_off()
        for ax, image in zip(axes, images):
            patch_tile(ax, image)
    return _save(fig, path)


def plot_balance(summary: dict[str, Any], path: Path) -> Path:
    """Bars: train positives/negatives overall, and stacked per fold with the positive share."""
    train, folds = summary["splits"]["train"], summary["folds"]["counts"]
    fig = _figure(9, 3.6)
    overall, per_fold = fig.subplots(1, 2, width_ratios=[1, max(2, len(folds))])
    counts = [train["negatives"], train["positives"]]
    bars = overall.bar(["label 0", "label 1"], counts, color=[COLOURS[0], COLOURS[1]])
    overall.bar_label(bars, [f"{c:,}\n{_pct(c, train['count'])}" for c in counts], padding=2, fontsize=8)
    overall.set(title=f"train: {train['count']:,} patches", ylabel="patches")
    overall.margins(y=0.25)
    x = [str(f["fold"]) for f in folds]
    negatives = [f["negatives"] for f in folds]
    per_fold.bar(x, negatives, color=COLOURS[0], label="label 0")
    top = per_fold.bar(x, [f["positives"] for f in folds], bottom=negatives, color=COLOURS[1], label="label 1")
    per_fold.bar_label(top, [_pct(f["positives"], f["count"]) for f in folds], padding=2, fontsize=8)
    per_fold.set(title="per fold (positive share on top)", xlabel="fold", ylabel="patches")
    per_fold.margins(y=0.15)
    per_fold.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _split_colour(split: str) -> str:
    return {"train": "tab:purple", "valid": "tab:green", "test": "tab:gray"}.get(split, "tab:brown")


def plot_histograms(hist: dict[str, np.ndarray], path: Path) -> Path:
    """One panel per channel: share of pixels at each value, train label 0 and 1, every other split dashed."""
    fig = _figure(11, 3.3)
    for c, (ax, name) in enumerate(zip(fig.subplots(1, 3, sharey=True), ("red", "green", "blue"))):
        for split, counts in hist.items():
            if split == "train":  # by label, filled
                for label in range(len(counts)):
                    share = _share_of(counts[label, c])
                    if share is not None:
                        ax.fill_between(np.arange(len(share)), share, step="mid", alpha=0.25, color=COLOURS[label])
                        ax.step(np.arange(len(share)), share, where="mid", lw=1, color=COLOURS[label],
                                label=f"train label {label}")
                continue
            share = _share_of(counts[:, c].sum(axis=0))  # other splits as a whole: a dashed outline, to spot a shift
            if share is not None:
                ax.step(np.arange(len(share)), share, where="mid", lw=1, ls="--", color=_split_colour(split),
                        label=split)
        ax.set(title=f"{name} channel", xlabel="pixel value (0-255)", xlim=(0, 255))
        ax.label_outer()
    fig.axes[0].set_ylabel("share of pixels")
    fig.axes[0].legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def _share_of(counts: np.ndarray) -> np.ndarray | None:
    total = counts.sum()
    return counts / total if total else None


def plot_saturation(eda: Eda, path: Path) -> Path:
    """Distribution of per-patch mean saturation: train by label, every other split whole; the background cut."""
    background = eda.summary["background"]
    threshold = background["threshold"]
    groups = []  # (name, values, colour, background facts)
    for split, values in eda.saturation.items():
        if split == "train" and "train" in eda.labels:
            groups += [(f"train label {k}", values[eda.labels["train"] == k], COLOURS[k],
                        background["train"]["by_label"][str(k)]) for k in (0, 1)]
        else:
            groups.append((split, values, _split_colour(split), background[split]))
    top = max([0.5] + [float(v.max()) for _, v, _, _ in groups if len(v)])
    bins = np.linspace(0, top * 1.02, 60)
    fig = _figure(7, 3.4)
    ax = fig.subplots()
    for name, values, colour, part in groups:
        if len(values):
            ax.hist(values, bins=bins, histtype="step", lw=1.5, color=colour,
                    label=f"{name}: {_pct(part['background'], part['images'])} background")
    ax.axvline(threshold, color="black", ls="--", lw=1)
    ax.annotate(f"{threshold}", (threshold, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                textcoords="offset points", fontsize=8)
    ax.set(title="mean HSV saturation per patch", xlabel="mean saturation (max-min)/max", ylabel="patches")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _source_path(layout: KaggleLayout, split: str, sample_id: str) -> Path | None:
    folder = layout.train if split == "train" else layout.test
    if not sample_id or folder is None:
        return None
    candidates = [folder / f"{sample_id}{suffix}" for suffix in (".tif", ".tiff")]
    return next((p for p in candidates if p.is_file()), candidates[0])


def source_tile(path: Path | None, shape: tuple[int, int, int]) -> np.ndarray | str:
    """A source tif's pixels for the report, or why they cannot be shown."""
    if path is None:
        return "no file"
    try:
        data, _ = read_file(str(path))
        return decoder_for(tuple(shape)).decode(data)
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    except Reject as reject:
        return reject.reason


def _tile(ax, tile: np.ndarray | str, title: str, text: str = "") -> None:
    """A patch, or a grey placeholder with `text` (default: why the patch cannot be shown)."""
    tile_axes(ax)
    ax.set_title(title, fontsize=7)
    if isinstance(tile, str):
        ax.imshow(np.full((8, 8, 3), 0.88))
        wrapped = "\n".join(textwrap.fill(line, 16) for line in (text or tile).splitlines())
        ax.text(3.5, 3.5, wrapped, ha="center", va="center", fontsize=7, color="0.3")
    else:
        ax.imshow(tile, interpolation="nearest")


def _tile_grid(n: int, per_row: int, title: str):
    """A figure of `n` small square tiles, `per_row` to a row; axes stay off until a tile is drawn."""
    per_row = min(n, per_row)
    rows = -(-n // per_row)
    fig = _figure(max(per_row * 1.35, 3.4), rows * 1.62 + 0.3)  # wide enough for the title
    fig.suptitle(title, fontsize=10)
    axes = fig.subplots(rows, per_row, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    return fig, axes


def plot_duplicates(duplicates: pd.DataFrame, layout: KaggleLayout, shape, path: Path, limit: int = 8) -> Path:
    """Pairs of kept | dropped, a few of each kind."""
    shown = duplicates.groupby("kind", sort=True).head(max(1, limit // 3)).head(limit)
    fig, axes = _tile_grid(2 * len(shown), 8, f"duplicates: {len(shown)} of {len(duplicates)} shown")
    dropped_as = dict(zip(duplicates["dropped"], duplicates["kind"]))  # a kept copy can be dropped later (leakage)
    for pair, row in zip(axes.reshape(-1, 2), shown.itertuples()):
        copy_split = "test" if row.kind.endswith("test-duplicate") else "train"  # where the second copy is
        kept_split = "test" if row.kind.endswith(("train-test", "test-duplicate")) else "train"  # dihedral-* too
        kept = source_tile(_source_path(layout, kept_split, row.kept), shape) if row.kept else "none kept"
        later = dropped_as.get(row.kept) if kept_split == "train" else None
        title = f"kept, then dropped: {later}" if later else f"kept ({kept_split})"
        _tile(pair[0], kept, f"{title}\n{_short_id(row.kept)}")
        second = f"also kept: {row.kind}" if is_kept_kind(row.kind) else f"dropped: {row.kind}"
        _tile(pair[1], source_tile(_source_path(layout, copy_split, row.dropped), shape),
              f"{second}\n{_short_id(row.dropped)}")
    return _save(fig, path)


def _short_id(sample_id: str) -> str:
    """A 40-character id on two lines of a tile title, whole: ids are how users find the file."""
    return sample_id if len(sample_id) <= 20 else f"{sample_id[:20]}\n{sample_id[20:]}"


def plot_rejects(rejects: pd.DataFrame, layout: KaggleLayout, shape, path: Path, limit: int = 12) -> Path:
    """Rejected files, a couple per reason; undecodable ones as a placeholder naming the reason."""
    shown = rejects.groupby("reason", sort=True).head(2).head(limit)
    fig, axes = _tile_grid(len(shown), 6, f"rejected files: {len(shown)} of {len(rejects)} shown")
    for ax, row in zip(axes, shown.itertuples()):
        tile = source_tile(layout.root / row.path, shape) if row.path else "no file"  # read_file opens no link or pipe
        _tile(ax, tile, f"{row.reason}\n{row.id[:12]}", text=f"{tile}:\n{row.detail[:60]}" if row.detail else "")
    return _save(fig, path)


def add_run(run: Path, out: Path) -> tuple[list[Path], list[str]]:
    """Copy the trainer's figures into `out`, re-drawing missing ones from its data with the trainer's own plots."""
    from ..train import plots

    if (run / "trials.csv").is_file():
        return add_sweep(run, out)
    figures, notes = [], []
    for name in RUN_FIGURES:
        target = out / f"run_{name}.png"
        if (run / f"{name}.png").is_file():
            shutil.copyfile(run / f"{name}.png", target)
        elif name == "curves" and (run / "metrics.json").is_file():
            metrics = json.loads((run / "metrics.json").read_text())
            plots.plot_curves(metrics.get("epochs", []), metrics.get("best_epoch"), target)
        elif name != "curves" and (run / "val_predictions.csv").is_file():
            predictions = pd.read_csv(run / "val_predictions.csv")
            draw = plots.plot_roc if name == "roc" else plots.plot_confusion
            draw(predictions["label"].to_numpy(), predictions["prob"].to_numpy(), target)
        else:
            notes.append(f"Run {name} figure skipped: {run} has no {name}.png and nothing to re-plot it from.")
            continue
        figures.append(target)
    return figures, notes


def add_sweep(sweep: Path, out: Path) -> tuple[list[Path], list[str]]:
    """A `pcam-prep sweep` folder: its trials figure, then the best trial's run figures."""
    from ..train.sweep_plots import plot_trials

    rows = pd.read_csv(sweep / "trials.csv").replace({np.nan: None}).to_dict("records")
    best = json.loads((sweep / "best.json").read_text()) if (sweep / "best.json").is_file() else None
    figures = [plot_trials(rows, best.get("importances") if best else None, out / "run_sweep.png")]
    if best is None:
        return figures, [f"Sweep {sweep}: {len(rows)} trials, none complete yet."]
    run_figures, notes = add_run(sweep / best["run"], out)
    return figures + run_figures, [f"Sweep {sweep}: {len(rows)} trials; best trial {best['trial']} (val AUC "
                                   f"{best['best_val_auc']:.4f}), whose run figures follow."] + notes


def render_html(summary: dict[str, Any], figures: list[tuple[str, str]], notes: list[str], extra: str = "") -> str:
    """A self-contained page: title, stats table, figures (relative links) with captions, notes."""
    esc = html.escape
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary_rows(summary))
    body = "".join(f'<figure><img src="{esc(name)}" alt="{esc(name)}"><figcaption>{esc(caption)}</figcaption>'
                   f"</figure>\n" for name, caption in figures)
    items = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>pcam-prep stats</title>\n<style>{_CSS}"
            f"</style></head><body>\n<h1>pcam-prep stats</h1>\n<p>{esc(summary['target'])} ({esc(summary['kind'])}, "
            f"read from {esc(summary['source'])})</p>\n<table>{rows}</table>\n{extra}{body}"
            + (f"<h2>Notes</h2><ul>{items}</ul>\n" if notes else "") + "</body></html>\n")


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse}"
        "th,td{padding:2px 10px;border-bottom:1px solid #ddd;text-align:left}img{max-width:100%}"
        "figure{margin:2em 0}figcaption{color:#555;font-size:.9em}")


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) lines of the html table: one per split, in the manifest's order."""
    background = summary["background"]
    channels = zip("RGB", summary["stats"]["mean"] or [], summary["stats"]["std"] or [])  # null: no train image
    rows = [("image shape", " x ".join(map(str, summary["image_shape"])))]
    for name, split in summary["splits"].items():
        positives = f" ({split['positives']:,} positive, {_pct(split['positives'], split['count'])})" \
            if split["labelled"] else ""
        rows.append((name, f"{split['count']:,}{positives}"))
    parts = []
    for name in summary["splits"]:
        parts.append(f"{name} {_pct(background[name]['background'], background[name]['images'])}")
        parts += [f"{name} label {k} {_pct(p['background'], p['images'])}"
                  for k, p in background[name].get("by_label", {}).items()]
    return rows + [
        ("folds", ", ".join(f"{f['fold']}: {f['count']:,} ({_pct(f['positives'], f['count'])} pos)"
                            for f in summary["folds"]["counts"])),
        ("mean / std (0-1)", ", ".join(f"{c} {m:.4f} / {s:.4f}" for c, m, s in channels)),
        ("rejects", f"{summary['rejects']['count']:,} {_by(summary['rejects']['by_reason'])}"),
        ("duplicates", f"{summary['duplicates']['count']:,} {_by(summary['duplicates']['by_kind'])}"),
        ("background", ", ".join(parts)),
    ]


def _by(counts: dict[str, int]) -> str:
    return "(" + ", ".join(f"{k}: {v:,}" for k, v in counts.items()) + ")" if counts else ""
