"""`pcam-prep stats --report DIR`: PNG figures and an index.html that shows them.

Figures are drawn with matplotlib's object API (`Figure`, rendered by Agg): no pyplot, so no
global figure state, no GUI backend, nothing left open between figures.
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

from .decode import Reject, read_file
from .eda import Eda
from .sources.kaggle import KaggleLayout
from .validate import decoder_for

logger = logging.getLogger(__name__)

DPI = 110
COLOURS = {0: "tab:blue", 1: "tab:red", "test": "tab:gray"}
LABEL_NAMES = {0: "label 0: no tumour in the centre", 1: "label 1: tumour in the centre"}
RUN_FIGURES = ("curves", "roc", "confusion")
_PER_ROW = 8


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


CAPTIONS = {
    "samples": "Random train patches per label; the box is the 32x32 centre window that decides the label.",
    "label_balance": "Train label balance overall and per fold; folds are stratified, so their shares should match.",
    "intensity_histograms": "Per-channel pixel intensity distributions: train label 0 vs label 1, and test (dashed).",
    "background_saturation": "Mean HSV saturation per patch; patches left of the dashed line count as background.",
    "duplicates": "Duplicates: the kept file beside each dropped copy, a few of each kind.",
    "rejects": "Rejected files, a couple per reason; files that cannot be decoded show the reason instead.",
    "run_curves": "Training curves: loss, validation AUC and accuracy per epoch.",
    "run_roc": "Validation ROC curve.",
    "run_confusion": "Validation confusion matrix.",
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
    galleries, notes = gallery_figures(eda, out)
    figures += galleries
    if run is not None:
        run_figures, run_notes = add_run(Path(run), out)
        figures += run_figures
        notes += [f"Run figures from {run}."] + run_notes
    index = out / "index.html"
    index.write_text(render_html(eda.summary, [(p.name, CAPTIONS[p.stem]) for p in figures], notes))
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
    from matplotlib.patches import Rectangle

    rows = {label: max(1, -(-len(images) // _PER_ROW)) for label, images in samples.items()}
    fig = _figure(_PER_ROW * 1.25, sum(rows.values()) * 1.3 + 0.5 * len(rows))
    parts = fig.subfigures(len(samples), 1, height_ratios=list(rows.values()))
    for part, (label, images) in zip(np.atleast_1d(parts), samples.items()):
        part.suptitle(f"{LABEL_NAMES[label]} ({len(images)} shown)", color=COLOURS[label], fontweight="bold")
        axes = np.atleast_1d(part.subplots(rows[label], _PER_ROW)).ravel()
        for ax in axes[len(images):]:
            ax.set_axis_off()
        for ax, image in zip(axes, images):
            _frame(ax)
            size = image.shape[0]
            window = size // 3
            ax.imshow(image, interpolation="nearest")
            ax.add_patch(Rectangle(((size - window) / 2 - 0.5,) * 2, window, window, fill=False, lw=1.2, ec="#00e5ff"))
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


def plot_histograms(hist: np.ndarray, path: Path) -> Path:
    """One panel per channel: share of pixels at each value, train label 0 and 1 and test overlaid."""
    fig = _figure(11, 3.3)
    values = np.arange(hist.shape[-1])
    for c, (ax, name) in enumerate(zip(fig.subplots(1, 3, sharey=True), ("red", "green", "blue"))):
        for group, key in enumerate((0, 1, "test")):
            counts = hist[group, c]
            if not counts.sum():
                continue
            share = counts / counts.sum()
            if key == "test":  # unlabelled: a dashed outline, to spot a train/test shift
                ax.step(values, share, where="mid", lw=1, ls="--", color=COLOURS[key], label="test")
            else:
                ax.fill_between(values, share, step="mid", alpha=0.25, color=COLOURS[key])
                ax.step(values, share, where="mid", lw=1, color=COLOURS[key], label=f"train label {key}")
        ax.set(title=f"{name} channel", xlabel="pixel value (0-255)", xlim=(0, 255))
        ax.label_outer()
    fig.axes[0].set_ylabel("share of pixels")
    fig.axes[0].legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_saturation(eda: Eda, path: Path) -> Path:
    """Distribution of per-patch mean saturation by label (and test), with the background cut."""
    background = eda.summary["background"]
    threshold = background["threshold"]
    groups = {f"train label {k}": (eda.saturation["train"][eda.labels == k], COLOURS[k]) for k in (0, 1)}
    groups["test"] = (eda.saturation["test"], COLOURS["test"])
    top = max([0.5] + [float(v.max()) for v, _ in groups.values() if len(v)])
    bins = np.linspace(0, top * 1.02, 60)
    fig = _figure(7, 3.4)
    ax = fig.subplots()
    for (name, (values, colour)), key in zip(groups.items(), ("0", "1", None)):
        if len(values):
            part = background["train"]["by_label"][key] if key else background["test"]
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


def _frame(ax) -> None:
    """No ticks, a thin grey frame: white or black patches stay visible as tiles."""
    ax.set_axis_on()
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set(color="0.7", lw=0.6)


def _tile(ax, tile: np.ndarray | str, title: str, text: str = "") -> None:
    """A patch, or a grey placeholder with `text` (default: why the patch cannot be shown)."""
    _frame(ax)
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
    for pair, row in zip(axes.reshape(-1, 2), shown.itertuples()):
        kept_split = "test" if row.kind.endswith("train-test") else "train"  # dihedral-train-test too
        kept = source_tile(_source_path(layout, kept_split, row.kept), shape) if row.kept else "none kept"
        _tile(pair[0], kept, f"kept ({kept_split})\n{row.kept[:10]}")
        _tile(pair[1], source_tile(_source_path(layout, "train", row.dropped), shape),
              f"dropped: {row.kind}\n{row.dropped[:10]}")
    return _save(fig, path)


def plot_rejects(rejects: pd.DataFrame, layout: KaggleLayout, shape, path: Path, limit: int = 12) -> Path:
    """Rejected files, a couple per reason; undecodable ones as a placeholder naming the reason."""
    shown = rejects.groupby("reason", sort=True).head(2).head(limit)
    fig, axes = _tile_grid(len(shown), 6, f"rejected files: {len(shown)} of {len(rejects)} shown")
    for ax, row in zip(axes, shown.itertuples()):
        tile = source_tile(layout.root / row.path, shape) if row.path else "no file"  # read_file opens no link or pipe
        _tile(ax, tile, f"{row.reason}\n{row.id[:12]}", text=f"{tile}:\n{row.detail[:60]}" if row.detail else "")
    return _save(fig, path)


def add_run(run: Path, out: Path) -> tuple[list[Path], list[str]]:
    """Copy the trainer's figures into `out`, re-plotting any that are missing from its data."""
    figures, notes = [], []
    for name in RUN_FIGURES:
        target = out / f"run_{name}.png"
        if (run / f"{name}.png").is_file():
            shutil.copyfile(run / f"{name}.png", target)
        elif name == "curves" and (run / "metrics.json").is_file():
            plot_curves(json.loads((run / "metrics.json").read_text()), target)
        elif name != "curves" and (run / "val_predictions.csv").is_file():
            predictions = pd.read_csv(run / "val_predictions.csv")
            (plot_roc if name == "roc" else plot_confusion)(predictions, target)
        else:
            notes.append(f"Run {name} figure skipped: {run} has no {name}.png and nothing to re-plot it from.")
            continue
        figures.append(target)
    return figures, notes


def plot_curves(metrics: dict[str, Any], path: Path) -> Path:
    epochs = metrics.get("epochs", [])
    x = [e.get("epoch", i) for i, e in enumerate(epochs)]
    fig = _figure(9, 3.4)
    for ax, keys, ylabel in zip(fig.subplots(1, 2), (("train_loss", "val_loss"), ("val_auc", "val_acc")),
                                ("loss", "validation metric")):
        for key in keys:
            ax.plot(x, [e.get(key, np.nan) for e in epochs], marker="o", ms=3, label=key)
        if metrics.get("best_epoch") is not None:
            best = metrics["best_epoch"]
            ax.axvline(best, color="gray", ls="--", lw=1, label=f"best epoch ({best})")
        ax.set(title=ylabel, xlabel="epoch", ylabel=ylabel)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_roc(predictions: pd.DataFrame, path: Path) -> Path:
    order = np.argsort(-predictions["prob"].to_numpy(), kind="stable")
    prob, y = predictions["prob"].to_numpy()[order], predictions["label"].to_numpy()[order]
    cut = np.r_[np.flatnonzero(np.diff(prob)), len(y) - 1]  # one point per distinct threshold: ties move together
    tpr = np.r_[0, np.cumsum(y)[cut] / max(1, y.sum())]
    fpr = np.r_[0, np.cumsum(1 - y)[cut] / max(1, (1 - y).sum())]
    fig = _figure(4.2, 4)
    ax = fig.subplots()
    ax.plot(fpr, tpr, lw=1.5, label=f"AUC {np.trapezoid(tpr, fpr):.3f}")
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1)
    ax.set(title="validation ROC", xlabel="false positive rate", ylabel="true positive rate", aspect="equal")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_confusion(predictions: pd.DataFrame, path: Path, threshold: float = 0.5) -> Path:
    y = predictions["label"].to_numpy().astype(int)
    guess = (predictions["prob"].to_numpy() >= threshold).astype(int)
    matrix = np.array([[np.sum((y == t) & (guess == p)) for p in (0, 1)] for t in (0, 1)])
    fig = _figure(4, 3.6)
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    for (t, p), count in np.ndenumerate(matrix):
        ax.text(p, t, f"{count:,}", ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    ax.set(title=f"validation, threshold {threshold}", xlabel="predicted label", ylabel="true label",
           xticks=[0, 1], yticks=[0, 1])
    return _save(fig, path)


def render_html(summary: dict[str, Any], figures: list[tuple[str, str]], notes: list[str]) -> str:
    """A self-contained page: title, stats table, figures (relative links) with captions, notes."""
    esc = html.escape
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary_rows(summary))
    body = "".join(f'<figure><img src="{esc(name)}" alt="{esc(name)}"><figcaption>{esc(caption)}</figcaption>'
                   f"</figure>\n" for name, caption in figures)
    items = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>pcam-prep stats</title>\n<style>{_CSS}"
            f"</style></head><body>\n<h1>pcam-prep stats</h1>\n<p>{esc(summary['target'])} ({esc(summary['kind'])}, "
            f"read from {esc(summary['source'])})</p>\n<table>{rows}</table>\n{body}"
            + (f"<h2>Notes</h2><ul>{items}</ul>\n" if notes else "") + "</body></html>\n")


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse}"
        "th,td{padding:2px 10px;border-bottom:1px solid #ddd;text-align:left}img{max-width:100%}"
        "figure{margin:2em 0}figcaption{color:#555;font-size:.9em}")


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) lines shared by the html table."""
    train, test = summary["splits"]["train"], summary["splits"]["test"]
    background = summary["background"]
    channels = zip("RGB", summary["stats"]["mean"], summary["stats"]["std"])
    return [
        ("image shape", " x ".join(map(str, summary["image_shape"]))),
        ("train", f"{train['count']:,} ({train['positives']:,} positive, {_pct(train['positives'], train['count'])})"),
        ("test", f"{test['count']:,}"),
        ("folds", ", ".join(f"{f['fold']}: {f['count']:,} ({_pct(f['positives'], f['count'])} pos)"
                            for f in summary["folds"]["counts"])),
        ("mean / std (0-1)", ", ".join(f"{c} {m:.4f} / {s:.4f}" for c, m, s in channels)),
        ("rejects", f"{summary['rejects']['count']:,} {_by(summary['rejects']['by_reason'])}"),
        ("duplicates", f"{summary['duplicates']['count']:,} {_by(summary['duplicates']['by_kind'])}"),
        ("background", ", ".join(f"{name} {_pct(part['background'], part['images'])}" for name, part in
                                 (("train", background["train"]), ("label 0", background["train"]["by_label"]["0"]),
                                  ("label 1", background["train"]["by_label"]["1"]), ("test", background["test"])))),
    ]


def _by(counts: dict[str, int]) -> str:
    return "(" + ", ".join(f"{k}: {v:,}" for k, v in counts.items()) + ")" if counts else ""
