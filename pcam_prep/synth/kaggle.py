"""Synthetic H&E-like patches in exactly the Kaggle "Histopathologic Cancer Detection" layout and file format.

Real data cannot be downloaded here, so tests and the bundled sample use these. Label rule (PCam): 1 iff a
tumour pixel lies in the centre window (32:64 of 96). Files are named by the sha1 of their pixel bytes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import tifffile

from ..files import tmp_path, write_csv_atomic
from ..progress import Counter, ProgressFn
from ..schema import centre_window
from .noise import TRUTH_NAME, flip_rows, write_truth

logger = logging.getLogger(__name__)

_PROGRESS_EVERY = 256
_BANK_SEED = 20240607  # fixed: the nucleus and grain banks are part of the generator, not of `seed`
_RING_TUMOUR_P = 0.35  # share of negatives with tumour clusters outside the centre window
_MASK_THRESHOLD = 0.25  # tumour-nucleus density above which a pixel counts as tumour
_PAD, _REACH = 32, 16  # nuclei are stamped on a canvas padded by _PAD; stamps reach < _REACH px from centre
# Optical density per unit of eosin (~ (230,170,200)) and haematoxylin (~ (80,50,140)), per R, G, B.
_STAIN_OD = np.array([[0.10, 0.41, 0.24], [1.10, 1.45, 0.55]])


@dataclass(frozen=True)
class SynthSummary:
    """What `write_kaggle` wrote: the root folder, file counts and the number of positive train patches."""

    out: Path
    n_train: int
    n_test: int
    positives: int
    flipped: int = 0  # train labels flipped on purpose (label_noise); listed in label_noise.csv


def _gauss(rng: np.random.Generator, n: int) -> np.ndarray:
    """Approximately standard normal (Irwin-Hall, 4 uniforms): plain arithmetic, so identical on every CPU."""
    u = rng.random((4, n))
    return (u[0] + u[1] + u[2] + u[3] - 2.0) * np.sqrt(3.0)


def _sprites(rng: np.random.Generator, n: int, rmin: float, rmax: float, ecc: float, tumour: bool):
    """n nucleus stamps as padded (dy, dx, density) arrays of shape (n, K); padding has density 0."""
    r = int(np.ceil(rmax * (1 + ecc) ** 0.5 * 1.3)) + 1
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(float)
    phi, stamps = np.arctan2(yy, xx), []
    for _ in range(n):
        rad, e, th = rng.uniform(rmin, rmax), ecc * rng.uniform(0, 1) ** 2, rng.uniform(0, np.pi)
        a, b = rad * (1 + e) ** 0.5, rad / (1 + e) ** 0.5
        u, v = (xx * np.cos(th) + yy * np.sin(th)) / a, (yy * np.cos(th) - xx * np.sin(th)) / b
        wobble = 1.0  # irregular outline: a few low harmonics
        for k, amp in ((2, 0.1), (3, 0.08), (4, 0.04)) if tumour else ((2, 0.04),):
            wobble = wobble + rng.uniform(0, amp) * np.cos(k * phi + rng.uniform(0, 6.3))
        rho = np.sqrt(u * u + v * v) / wobble
        alpha = np.clip((1 - rho) * b + 0.5, 0, 1)  # ~1 px anti-aliased rim
        mottle = rng.uniform(0.8, 1.15, alpha.shape)  # chromatin texture
        if tumour:  # vesicular: pale centre, dark membrane, a nucleolus
            ny, nx = rng.uniform(-0.3, 0.3, 2) * rad
            nucleolus = 0.55 * np.exp(-((yy - ny) ** 2 + (xx - nx) ** 2) / 1.5)
            dens = alpha * (0.38 + 0.55 * np.clip(rho, 0, 1) ** 3 + nucleolus) * mottle
        else:
            dens = alpha * rng.uniform(0.85, 1.05) * mottle
        keep = dens > 0.02
        stamps.append((yy[keep], xx[keep], dens[keep]))
    out = np.zeros((3, n, max(len(s[0]) for s in stamps)))
    for i, s in enumerate(stamps):
        out[:, i, : len(s[0])] = s
    return out[0].astype(np.int32), out[1].astype(np.int32), out[2]


@lru_cache(maxsize=1)
def _banks():
    rng = np.random.default_rng(_BANK_SEED)
    normal = _sprites(rng, 160, 1.8, 3.4, 2.0, tumour=False)  # mostly round, a few spindly fibroblasts
    tumour = _sprites(rng, 160, 5.0, 8.5, 0.6, tumour=True)
    grain = 3.0 * _gauss(rng, 3 * 400 * 400)  # pixel noise (~3 grey levels), cropped per patch
    j, i = np.mgrid[-4:5, -4:5].astype(float)  # hexagonal lattice, unit spacing: tumour cells crowd on it
    lat = np.stack([j * 0.866, i + 0.5 * (j % 2)]).reshape(2, -1)
    lat = lat[:, (lat**2).sum(0) <= 9.0]
    return normal, tumour, grain, (lat, np.sqrt((lat**2).sum(0)), np.arctan2(lat[0], lat[1]))


@lru_cache(maxsize=8)
def _geometry(size: int):
    """Per-size constants: smooth upsampling matrices and stamp offsets/bounding boxes on the padded canvas."""

    def up(n: int) -> np.ndarray:  # (size, n): U @ G @ U.T turns an n x n grid into a smooth unit-variance field
        w = np.exp(-((np.linspace(0, n - 1, size)[:, None] - np.arange(n)[None, :]) ** 2) / 0.7)
        return w / np.sqrt((w**2).sum(1, keepdims=True))

    width, stamps = size + 2 * _PAD, []
    for dy, dx, dens in _banks()[:2]:
        assert max(np.abs(dy).max(), np.abs(dx).max()) < _REACH
        nz = dens > 0
        box = np.stack([np.where(nz, dy, 99).min(1), np.where(nz, dy, -99).max(1),
                        np.where(nz, dx, 99).min(1), np.where(nz, dx, -99).max(1)])
        stamps.append((dy * width + dx, dens, box))
    return up(6), up(24), width, stamps


def _stamp(canvas: np.ndarray, width: int, stamp, ys, xs, ids, gain) -> None:
    """Max-composite stamps `ids` centred at (ys, xs) (patch coordinates) into the flat padded canvas."""
    off, dens, _ = stamp
    base = (ys.astype(np.int32) + _PAD) * width + xs.astype(np.int32) + _PAD
    np.maximum.at(canvas, (base[:, None] + off[ids]).ravel(), (dens[ids] * gain[:, None]).ravel())


def _cluster(rng: np.random.Generator, cy: float, cx: float, q: np.ndarray, size: int):
    """Tumour nuclei (ys, xs, ids, gains) crowded in an irregular blob around (cy, cx); q: 4 uniforms."""
    lat, norm, phi = _banks()[3]
    d = rng.random((5, lat.shape[1]), dtype=np.float32)
    reach = (0.9 + 1.6 * q[1]) * (1 + 0.3 * np.cos(2 * phi - 6.3 * q[2]) + 0.2 * np.cos(3 * phi - 6.3 * q[3]))
    ys = np.rint(cy + (11 + 4 * q[0]) * lat[0] + 4 * d[0] - 2).astype(np.int32)
    xs = np.rint(cx + (11 + 4 * q[0]) * lat[1] + 4 * d[1] - 2).astype(np.int32)
    lim = _PAD - _REACH  # every stamp stays on the padded canvas
    keep = (norm <= reach) & (d[4] > 0.12) & (np.minimum(ys, xs) >= -lim) & (np.maximum(ys, xs) < size + lim)
    return ys[keep], xs[keep], (d[2, keep] * 160).astype(np.int32), 0.75 + 0.35 * d[3, keep]


def make_patch(rng: np.random.Generator, label: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Return (image (size,size,3) uint8, tumour_mask (size,size) bool); label == mask[centre_window].any()."""
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    grain = _banks()[2]
    u6, u24, width, (normal, tumour) = _geometry(size)
    win = (centre_window(size),) * 2
    w0, w1 = win[0].start, win[0].stop
    area, grid = (size / 96) ** 2, np.arange(size, dtype=float)
    crop = (slice(_PAD, _PAD + size), slice(_PAD, _PAD + size))
    for _ in range(100):  # a retry only when a draw breaks the label rule (rare)
        q = rng.random(48)  # every per-patch scalar in one draw: generator calls dominate the cost
        parts = []
        if label == 1:  # a cluster centred on (or just beside) the centre window
            parts.append(_cluster(rng, *(w0 - 4 + (w1 - w0 + 8) * q[0:2]), q[2:6], size))
        if q[6] < (0.2 if label else _RING_TUMOUR_P):  # a cluster centred well outside the window
            lo, hi = max(w0 - 10, 1), max(size - w1 - 10, 1)
            far = q[7] * (lo + hi)
            far = far if far < lo else size - (far - lo)
            parts.append(_cluster(rng, *((far, q[8] * size) if q[9] < 0.5 else (q[8] * size, far)), q[44:48], size))
        ty, tx, tid, tgain = (np.concatenate(c) for c in zip(*parts)) if parts else [np.zeros(0, np.int32)] * 4
        if label == 0 and len(ty):  # drop whole nuclei whose bounding box reaches into the window
            box = tumour[2][:, tid]
            keep = (ty + box[1] < w0) | (ty + box[0] >= w1) | (tx + box[3] < w0) | (tx + box[2] >= w1)
            ty, tx, tid, tgain = ty[keep], tx[keep], tid[keep], tgain[keep]
            if keep.sum() < 3:
                continue
        t, cells = np.zeros(width * width), np.zeros((size, size))
        if len(ty):  # tumour nuclei, and their cell bodies as a sum of separable Gaussian bumps
            _stamp(t, width, tumour, ty, tx, tid, tgain)
            gy = np.exp((grid[None, :] - ty[:, None]) ** 2 * (-1 / 90))
            gx = np.exp((grid[None, :] - tx[:, None]) ** 2 * (-1 / 90))
            cells = np.minimum(gy.T @ gx, 1.0)
        # Normal nuclei (tumour displaces them, so cellularity stays similar), sometimes a lymphocyte aggregate.
        n = max(int((10 + 110 * q[12] ** 1.3) * area) - 4 * len(ty), 5)
        m = int((15 + 55 * q[14]) * area) if q[13] < 0.3 else 0
        d = rng.random((5, n + m), dtype=np.float32)
        ny, nx = (d[:2] * (size + 6) - 3).astype(np.int32)
        ngain = 0.7 + 0.35 * d[3]
        if m:
            rad = (5 + 7 * q[17]) * np.sqrt(-2 * np.log1p(-d[0, n:].astype(float)))  # Box-Muller: Gaussian blob
            ang = 6.2832 * d[1, n:].astype(float)
            ny[n:] = np.clip(q[15] * size + rad * np.cos(ang), -3, size + 2)
            nx[n:] = np.clip(q[16] * size + rad * np.sin(ang), -3, size + 2)
            ngain[n:] = 1.0 + 0.25 * d[3, n:]
        away = cells[np.clip(ny, 0, size - 1), np.clip(nx, 0, size - 1)] < d[4] if len(ty) else slice(None)
        h = np.zeros(width * width)
        _stamp(h, width, normal, ny[away], nx[away], (d[2, away] * 160).astype(np.int32), ngain[away])
        hd, t2 = h.reshape(width, width)[crop], t.reshape(width, width)[crop]
        # Stroma: smooth eosin field, faint fibre streaks, sometimes white gaps (fat, lumen).
        g = _gauss(rng, 180)
        e = 0.8 + u6 @ (0.2 * g[:36].reshape(6, 6) @ u6.T + 0.05 * g[36:].reshape(6, 24) @ u24.T)
        e = e.T if q[18] < 0.5 else e  # fibres run across or down
        if q[19] < 0.35:  # 1-3 axis-aligned ellipses: separable squared distances
            k = int(1 + 3 * q[20])
            c, r = q[21 : 21 + 2 * k].reshape(2, k, 1) * size, 3 + 8 * q[27 : 27 + 2 * k].reshape(2, k, 1)
            ay, ax = ((grid - c) / r) ** 2
            solid = np.minimum(np.maximum((ay[:, :, None] + ax[:, None, :]).min(0) * 4 - 3, 0), 1)  # 1 - gap
            t2, hd, e = t2 * solid, hd * solid, e * (0.08 + 0.92 * solid)
        mask = t2 > _MASK_THRESHOLD
        if bool(mask[win].any()) != bool(label):
            continue
        # Beer-Lambert mix of the two stains, per-patch stain strength and hue jitter, then grain.
        estain = (0.65 + 0.8 * q[33]) * np.maximum(e + 0.25 * cells, 0.05)
        hstain = (0.65 + 0.7 * q[34]) * (np.maximum(hd, t2) + 0.07 * cells)
        ods = _STAIN_OD * (0.85 + 0.3 * q[35:41].reshape(2, 3))
        img = np.exp(np.stack([estain, hstain], axis=-1).reshape(-1, 2) @ -ods).reshape(size, size, 3)
        img *= 255 * (0.9 + 0.1 * q[11])
        noise = grain[(o := int(q[43] * max(len(grain) - img.size, 0))) : o + img.size]  # a random crop
        img += (noise if noise.size == img.size else np.resize(noise, img.size)).reshape(img.shape)  # tiled if huge
        np.clip(img, 0, 255, out=img)
        assert bool(mask[win].any()) == bool(label), "PCam label rule violated"
        return img.astype(np.uint8), mask
    raise RuntimeError(f"could not draw a size-{size} patch with label {label}")


def _imwrite_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, img)  # default arguments, as the real files were written
    return buf.getvalue()


@lru_cache(maxsize=8)
def _tiff_header(shape: tuple[int, ...]) -> bytes | None:
    """The bytes `tifffile.imwrite` puts before the pixels (one uncompressed strip, last), if they do not
    depend on the pixels: two probe images must agree. None: call imwrite for every file instead."""
    n = int(np.prod(shape))
    probes = [_imwrite_bytes(np.full(shape, v, np.uint8)) for v in (0, 255)]
    if any(p[-n:] != bytes([v]) * n for p, v in zip(probes, (0, 255))) or probes[0][:-n] != probes[1][:-n]:
        return None
    return probes[0][:-n]


def write_tif(folder: Path, img: np.ndarray, sample_id: str) -> None:
    """Write exactly the bytes of `tifffile.imwrite(path, img)`: to a temporary name, then renamed into place."""
    header = _tiff_header(img.shape)
    tmp = tmp_path(folder / f"{sample_id}.tif")
    with open(tmp, "wb") as fh:
        fh.write(_imwrite_bytes(img) if header is None else header + img.tobytes())
    os.replace(tmp, folder / f"{sample_id}.tif")


def write_labels(path: Path, rows: list[tuple[str, int]]) -> None:
    """`id,label`, rows sorted by id (train_labels.csv, sample_submission.csv)."""
    write_csv_atomic(path, ("id", "label"), sorted(rows))


def write_kaggle(out: Path, n_train: int, n_test: int, *, size: int = 96, seed: int = 0,
                 positive_fraction: float = 0.405, label_noise: float = 0.0,
                 progress: ProgressFn | None = None) -> SynthSummary:
    """Write a synthetic competition folder under `out`; the same arguments give byte-identical files.

    Writes train/<sha1>.tif, test/<sha1>.tif, train_labels.csv and sample_submission.csv (`id,label`, rows
    sorted by id, test labels all 0). round(n * positive_fraction) patches of each split are positive.
    Train does not depend on n_test. `progress("synth", done, total)` every 256 files and at the end.
    `label_noise` flips that share of the train labels in train_labels.csv (the pixels keep their
    true label) and lists them in label_noise.csv: ground truth for finding mislabelled patches.
    """
    for name, val in (("n_train", n_train), ("n_test", n_test), ("size", size)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < (32 if name == "size" else 0):
            raise ValueError(f"{name} must be an integer >= {32 if name == 'size' else 0}, got {val!r}")
    if not 0.0 <= positive_fraction <= 1.0:  # also rejects NaN
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction!r}")
    flipped = flip_rows(n_train, label_noise, seed)  # checks label_noise before anything is written
    out = Path(out)
    logger.info("synthesising %d train + %d test patches (size %d, seed %d) into %s", n_train, n_test, size, seed, out)
    seen: set[str] = set()
    rows: dict[str, list[tuple[str, int]]] = {}
    pending = positives = 0
    counter = Counter(progress, "synth", n_train + n_test)
    for split, n, split_rng in zip(("train", "test"), (n_train, n_test), np.random.default_rng(seed).spawn(2)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        label_rng, image_rng = split_rng.spawn(2)
        labels = np.zeros(n, np.int8)
        labels[: int(round(n * positive_fraction))] = 1
        labels = label_rng.permutation(labels)
        positives = int(labels.sum()) if split == "train" else positives
        rows[split] = []
        for label in labels.tolist():
            img, _ = make_patch(image_rng, label, size)
            sample_id = hashlib.sha1(img.tobytes()).hexdigest()
            while sample_id in seen:  # practically impossible; regenerate deterministically
                logger.warning("id collision on %s; regenerating", sample_id)
                img, _ = make_patch(image_rng, label, size)
                sample_id = hashlib.sha1(img.tobytes()).hexdigest()
            seen.add(sample_id)
            write_tif(folder, img, sample_id)
            rows[split].append((sample_id, label))
            pending += 1
            if pending == _PROGRESS_EVERY:
                counter.add(pending)
                pending = 0
        stale = sum(1 for p in folder.glob("*.tif") if p.stem not in seen)
        if stale:
            logger.warning("%s holds %d .tif files from an earlier run that are not in this dataset", folder, stale)
    truth = [(rows["train"][i][0], 1 - rows["train"][i][1], rows["train"][i][1]) for i in flipped.tolist()]
    for i in flipped.tolist():
        rows["train"][i] = (rows["train"][i][0], 1 - rows["train"][i][1])
    (out / TRUTH_NAME).unlink(missing_ok=True)
    if truth:
        write_truth(out / TRUTH_NAME, truth)
    write_labels(out / "train_labels.csv", rows["train"])
    write_labels(out / "sample_submission.csv", [(i, 0) for i, _ in rows["test"]])
    if pending:
        counter.add(pending)
    logger.info("wrote %d train (%d positive) and %d test patches to %s", n_train, positives, n_test, out)
    return SynthSummary(out=out, n_train=n_train, n_test=n_test, positives=positives, flipped=len(truth))
