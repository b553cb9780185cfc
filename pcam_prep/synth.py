"""Synthetic H&E-like patches written exactly in the Kaggle "Histopathologic Cancer Detection" layout.

Real data cannot be downloaded here, so tests and the bundled sample use these: 96x96 RGB uint8
TIFFs named by the sha1 of their pixel bytes, `train_labels.csv` and `sample_submission.csv`.
Label rule (PCam): 1 iff a tumour pixel lies in the centre window (32:64 for size 96).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import tifffile

logger = logging.getLogger(__name__)

CENTRE_FRACTION = 1 / 3  # PCam: label = any tumour pixel in the centre 32x32 of 96x96
_PROGRESS_EVERY = 256
_BANK_SEED = 20240607  # fixed: the sprite and noise banks are part of the format, not of `seed`
_RING_TUMOUR_P = 0.35  # share of negatives with tumour clusters outside the centre window
_MASK_THRESHOLD = 0.25  # haematoxylin density above which a tumour-nucleus pixel counts
# Optical density per unit stain (R, G, B): eosin ~ (230,170,200), haematoxylin ~ (80,50,140).
_EOSIN_OD = np.array([0.10, 0.41, 0.24], np.float32)
_HAEM_OD = np.array([1.10, 1.45, 0.55], np.float32)


@dataclass(frozen=True)
class SynthSummary:
    """What `write_kaggle` wrote: the root folder, file counts and train positives."""

    out: Path
    n_train: int
    n_test: int
    positives: int


def centre_window(size: int) -> tuple[slice, slice]:
    """Rows/cols of the PCam centre window: a size//3 square centred in the patch (32:64 for 96)."""
    w = int(size * CENTRE_FRACTION + 1e-9)
    start = (size - w) // 2
    return slice(start, start + w), slice(start, start + w)


def _sprites(rng: np.random.Generator, n: int, rmin: float, rmax: float, ecc: float, tumour: bool):
    """A bank of n nucleus stamps: padded (dy, dx, density) arrays of shape (n, K), padding has density 0."""
    r = int(np.ceil(rmax * (1 + ecc) ** 0.5 * 1.3)) + 1
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    phi = np.arctan2(yy, xx)
    stamps = []
    for _ in range(n):
        rad, e, th = rng.uniform(rmin, rmax), ecc * rng.uniform(0, 1) ** 2, rng.uniform(0, np.pi)
        a, b = rad * (1 + e) ** 0.5, rad / (1 + e) ** 0.5
        u = (xx * np.cos(th) + yy * np.sin(th)) / a
        v = (-xx * np.sin(th) + yy * np.cos(th)) / b
        wobble = 1.0
        for k, amp in ((2, 0.1), (3, 0.08), (4, 0.04)) if tumour else ((2, 0.04),):
            wobble = wobble + rng.uniform(0, amp) * np.cos(k * phi + rng.uniform(0, 6.3))
        rho = np.sqrt(u * u + v * v) / wobble
        alpha = np.clip((1 - rho) * b + 0.5, 0, 1)  # ~1 px anti-aliased rim
        mottle = rng.uniform(0.8, 1.15, alpha.shape)
        if tumour:  # vesicular: pale centre, dark membrane, a nucleolus
            ny, nx = rng.uniform(-0.3, 0.3, 2) * rad
            nucleolus = 0.55 * np.exp(-((yy - ny) ** 2 + (xx - nx) ** 2) / 1.5)
            dens = alpha * (0.38 + 0.55 * np.clip(rho, 0, 1) ** 3 + nucleolus) * mottle
        else:
            dens = alpha * rng.uniform(0.85, 1.05) * mottle
        keep = dens > 0.02
        stamps.append((yy[keep], xx[keep], dens[keep]))
    k = max(len(s[0]) for s in stamps)
    out = np.zeros((3, n, k), np.float32)
    for i, s in enumerate(stamps):
        out[:, i, : len(s[0])] = s
    return out[0].astype(np.int32), out[1].astype(np.int32), out[2]


_PAD = 32  # nuclei are stamped on a canvas padded by this much, so no per-pixel bounds checks are needed


@lru_cache(maxsize=1)
def _banks():
    rng = np.random.default_rng(_BANK_SEED)
    normal = _sprites(rng, 160, 1.8, 3.4, 2.0, tumour=False)  # a few spindly fibroblast nuclei
    tumour = _sprites(rng, 160, 5.0, 8.5, 0.6, tumour=True)
    grain = 3.0 * rng.standard_normal(3 * 400 * 400).astype(np.float32)  # pixel noise, ~3 grey levels
    return normal, tumour, grain


@lru_cache(maxsize=8)
def _geometry(size: int):
    """Per-size constants: upsampling matrices and stamp offsets into the padded flat canvas."""

    def up(n: int) -> np.ndarray:  # (size, n) Gaussian interpolation: U @ G @ U.T upsamples n x n smoothly
        w = np.exp(-((np.linspace(0, n - 1, size)[:, None] - np.arange(n)[None, :]) ** 2) / 0.7)
        return (w / np.sqrt((w**2).sum(1, keepdims=True))).astype(np.float32)  # keeps unit variance

    width = size + 2 * _PAD
    stamps = []
    for dy, dx, dens in _banks()[:2]:
        nz = dens > 0
        box = np.stack([np.where(nz, dy, 99).min(1), np.where(nz, dy, -99).max(1),
                        np.where(nz, dx, 99).min(1), np.where(nz, dx, -99).max(1)])
        stamps.append((dy * width + dx, dens, box))
    return up(6), up(24), width, stamps


def _stamp(canvas: np.ndarray, width: int, stamp, ys, xs, ids, gain) -> None:
    """Max-composite bank stamps `ids` centred at (ys, xs) (patch coordinates) into the flat padded canvas."""
    off, dens, _ = stamp
    base = (ys.astype(np.int32) + _PAD) * width + xs.astype(np.int32) + _PAD
    np.maximum.at(canvas, (base[:, None] + off[ids]).ravel(), (dens[ids] * gain[:, None]).ravel())


@lru_cache(maxsize=1)
def _lattice() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hexagonal lattice (2, L) with unit spacing out to radius 3 (tumour cells crowd on it), its radii and angles."""
    j, i = np.mgrid[-4:5, -4:5].astype(np.float32)
    pts = np.stack([j * 0.866, i + 0.5 * (j % 2)]).reshape(2, -1)
    pts = pts[:, (pts**2).sum(0) <= 9.0]
    return pts, np.sqrt((pts**2).sum(0)), np.arctan2(pts[0], pts[1])


def _cluster(rng: np.random.Generator, cy: float, cx: float, q: np.ndarray, size: int):
    """Tumour nuclei (ys, xs, bank ids, gains) crowded in an irregular blob around (cy, cx); q: 4 uniforms."""
    lat, norm, phi = _lattice()
    spacing = 11 + 4 * q[0]
    d = rng.random((5, lat.shape[1]), dtype=np.float32)
    reach = (0.9 + 1.6 * q[1]) * (1 + 0.3 * np.cos(2 * phi - 6.3 * q[2]) + 0.2 * np.cos(3 * phi - 6.3 * q[3]))
    ys = np.rint(cy + spacing * lat[0] + 4 * d[0] - 2).astype(np.int32)
    xs = np.rint(cx + spacing * lat[1] + 4 * d[1] - 2).astype(np.int32)
    lim = _PAD - 21  # keep every stamp on the padded canvas
    keep = (norm <= reach) & (d[4] > 0.12) & (np.minimum(ys, xs) >= -lim) & (np.maximum(ys, xs) < size + lim)
    return ys[keep], xs[keep], (d[2, keep] * 160).astype(np.int32), 0.75 + 0.35 * d[3, keep]


def make_patch(rng: np.random.Generator, label: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Return (image (size,size,3) uint8, tumour_mask (size,size) bool) obeying the PCam label rule."""
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    grain = _banks()[2]
    u6, u24, width, (normal, tumour) = _geometry(size)
    win = centre_window(size)
    w0, w1 = win[0].start, win[0].stop
    area = (size / 96) ** 2
    grid = np.arange(size, dtype=np.float32)
    crop = (slice(_PAD, _PAD + size), slice(_PAD, _PAD + size))
    for _ in range(100):  # retries only when a draw breaks the label rule (rare)
        q = rng.random(48)  # all per-patch scalars in one draw (generator calls are the slow part)
        parts = []
        if label == 1:
            cy, cx = w0 - 4 + (w1 - w0 + 8) * q[0:2]
            parts.append(_cluster(rng, cy, cx, q[2:6], size))
        if q[6] < (0.2 if label else _RING_TUMOUR_P):
            lo, hi = max(w0 - 10, 1), max(size - w1 - 10, 1)  # centre well outside the window
            far = q[7] * (lo + hi)
            far = far if far < lo else size - (far - lo)
            cy, cx = (far, q[8] * size) if q[9] < 0.5 else (q[8] * size, far)
            parts.append(_cluster(rng, cy, cx, q[44:48], size))
        ty, tx, tid, tgain = (np.concatenate(c) for c in zip(*parts)) if parts else [np.zeros(0, np.int32)] * 4
        if label == 0 and len(ty):  # drop whole nuclei whose bounding box reaches into the centre window
            box = tumour[2][:, tid]
            keep = (ty + box[1] < w0) | (ty + box[0] >= w1) | (tx + box[3] < w0) | (tx + box[2] >= w1)
            ty, tx, tid, tgain = ty[keep], tx[keep], tid[keep], tgain[keep]
            if keep.sum() < 3:
                continue
        t = np.zeros(width * width, np.float32)
        cells = np.zeros((size, size), np.float32)
        if len(ty):  # cell bodies: a sum of separable Gaussian bumps, one per tumour nucleus
            _stamp(t, width, tumour, ty, tx, tid, tgain.astype(np.float32))
            gy = np.exp((grid[None, :] - ty[:, None].astype(np.float32)) ** 2 * np.float32(-1 / 90))
            gx = np.exp((grid[None, :] - tx[:, None].astype(np.float32)) ** 2 * np.float32(-1 / 90))
            cells = np.minimum(gy.T @ gx, 1.0)
        # Normal nuclei (tumour displaces them, keeping overall cellularity similar); some lymphocyte aggregates.
        n = max(int((10 + 110 * q[12] ** 1.3) * area) - 4 * len(ty), 5)
        m = int((15 + 55 * q[14]) * area) if q[13] < 0.3 else 0
        d = rng.random((5, n + m), dtype=np.float32)
        ny = (d[0] * (size + 6) - 3).astype(np.int32)
        nx = (d[1] * (size + 6) - 3).astype(np.int32)
        ngain = 0.7 + 0.35 * d[3]
        if m:
            rad = (5 + 7 * q[17]) * np.sqrt(-2 * np.log1p(-d[0, n:]))  # Box-Muller: Gaussian blob
            ny[n:] = np.clip(q[15] * size + rad * np.cos(6.2832 * d[1, n:]), -3, size + 2)
            nx[n:] = np.clip(q[16] * size + rad * np.sin(6.2832 * d[1, n:]), -3, size + 2)
            ngain[n:] = 1.0 + 0.25 * d[3, n:]
        away = cells[np.clip(ny, 0, size - 1), np.clip(nx, 0, size - 1)] < d[4]
        h = np.zeros(width * width, np.float32)
        _stamp(h, width, normal, ny[away], nx[away], (d[2, away] * 160).astype(np.int32), ngain[away])
        # Stroma: smooth eosin field, faint fibre streaks, occasional white gaps (fat / lumen).
        g = rng.standard_normal(180, dtype=np.float32)
        e = 0.8 + 0.2 * (u6 @ g[:36].reshape(6, 6) @ u6.T)
        fib = u6 @ g[36:180].reshape(6, 24) @ u24.T
        e += 0.05 * (fib.T if q[18] < 0.5 else fib)
        hd = h.reshape(width, width)[crop]
        t2 = t.reshape(width, width)[crop]
        if q[19] < 0.35:  # 1-3 elliptical gaps, axis-aligned: separable squared distances
            k = int(1 + 3 * q[20])
            c, r = q[21 : 21 + 2 * k].reshape(2, k, 1) * size, 3 + 8 * q[27 : 27 + 2 * k].reshape(2, k, 1)
            ay, ax = (((grid - c) / r) ** 2).astype(np.float32)
            dd = (ay[:, :, None] + ax[:, None, :]).min(0)
            keep = np.minimum(np.maximum(dd * 4 - 3, 0), 1)  # 1 - gap, with a soft 1/4-radius edge
            t2, hd, e = t2 * keep, hd * keep, e * (0.08 + 0.92 * keep)
        mask = t2 > _MASK_THRESHOLD
        if bool(mask[win].any()) != bool(label):
            continue
        estain = np.float32(0.65 + 0.8 * q[33]) * np.maximum(e + 0.25 * cells, 0.05)
        hstain = np.float32(0.65 + 0.7 * q[34]) * (np.maximum(hd, t2) + 0.07 * cells)
        eod = _EOSIN_OD * (0.85 + 0.3 * q[35:38]).astype(np.float32)
        hod = _HAEM_OD * (0.85 + 0.3 * q[40:43]).astype(np.float32)
        stains = np.stack([estain, hstain], axis=-1).reshape(-1, 2)
        img = np.exp(stains @ -np.stack([eod, hod])).reshape(size, size, 3)  # Beer-Lambert
        img *= np.float32(255 * (0.9 + 0.1 * q[11]))
        if len(grain) >= 2 * img.size:
            o = int(q[38] * (len(grain) - img.size))
            img += grain[o : o + img.size].reshape(img.shape)
        else:  # huge patches: draw the grain directly
            img += 3.0 * rng.standard_normal(img.shape, dtype=np.float32)
        np.clip(img, 0, 255, out=img)
        assert bool(mask[win].any()) == bool(label), "PCam label rule violated"
        return img.astype(np.uint8), mask
    raise RuntimeError(f"could not draw a size-{size} patch with label {label}")


@lru_cache(maxsize=8)
def _tiff_header(shape: tuple[int, ...]) -> bytes | None:
    """What `tifffile.imwrite(path, img)` writes before the pixels, when that does not depend on them.

    With default arguments tifffile writes a fixed header + IFD and then the raw pixels as one strip;
    two probe images confirm that, so each file can be the header plus the pixel bytes. None: no such luck.
    """
    heads = []
    for fill in (0, 255):
        buf = io.BytesIO()
        tifffile.imwrite(buf, np.full(shape, fill, np.uint8))
        data = buf.getvalue()
        n = int(np.prod(shape))
        if data[len(data) - n :] != bytes([fill]) * n:
            return None
        heads.append(data[: len(data) - n])
    return heads[0] if heads[0] == heads[1] else None


def _write_tif(folder: Path, img: np.ndarray, sample_id: str) -> None:
    """Write exactly the bytes of `tifffile.imwrite(path, img)` (default arguments), atomically."""
    header = _tiff_header(img.shape)
    if header is None:
        buf = io.BytesIO()
        tifffile.imwrite(buf, img)
        data = buf.getvalue()
    else:
        data = header + img.tobytes()
    tmp = folder / f".{sample_id}.tif.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, folder / f"{sample_id}.tif")


def _write_csv(path: Path, rows: list[tuple[str, int]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(("id", "label"))
        w.writerows(sorted(rows))
    os.replace(tmp, path)


def write_kaggle(
    out: Path,
    n_train: int,
    n_test: int,
    *,
    size: int = 96,
    seed: int = 0,
    positive_fraction: float = 0.405,
    progress: Callable[[int], None] | None = None,
) -> SynthSummary:
    """Write a synthetic dataset in the Kaggle layout under `out`; same arguments -> same bytes.

    Writes out/train/<sha1>.tif, out/test/<sha1>.tif, out/train_labels.csv and
    out/sample_submission.csv (rows sorted by id). `progress(k)` is called after every k files.
    """
    for name, val in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {val!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 32:
        raise ValueError(f"size must be an integer >= 32, got {size!r}")
    if not 0.0 <= positive_fraction <= 1.0:  # also rejects NaN
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction!r}")
    out = Path(out)
    logger.info("synthesising %d train + %d test patches (size %d, seed %d) into %s", n_train, n_test, size, seed, out)
    seen: set[str] = set()
    pending = 0
    rows: dict[str, list[tuple[str, int]]] = {}
    positives = 0
    for split, n, split_rng in zip(("train", "test"), (n_train, n_test), np.random.default_rng(seed).spawn(2)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        label_rng, image_rng = split_rng.spawn(2)
        labels = np.zeros(n, np.int8)
        labels[: int(round(n * positive_fraction))] = 1
        labels = label_rng.permutation(labels)
        if split == "train":
            positives = int(labels.sum())
        rows[split] = []
        for label in labels.tolist():
            while True:
                img, _ = make_patch(image_rng, label, size)
                sample_id = hashlib.sha1(img.tobytes()).hexdigest()
                if sample_id not in seen:
                    break
                logger.warning("id collision on %s; regenerating", sample_id)
            seen.add(sample_id)
            _write_tif(folder, img, sample_id)
            rows[split].append((sample_id, label))
            pending += 1
            if progress is not None and pending == _PROGRESS_EVERY:
                progress(pending)
                pending = 0
        stale = sum(1 for p in folder.glob("*.tif") if p.stem not in seen)
        if stale:
            logger.warning("%s holds %d .tif files from an earlier run that are not in this dataset", folder, stale)
    _write_csv(out / "train_labels.csv", rows["train"])
    _write_csv(out / "sample_submission.csv", [(i, 0) for i, _ in rows["test"]])
    if progress is not None and pending:
        progress(pending)
    logger.info("wrote %d train (%d positive) and %d test patches", n_train, positives, n_test)
    return SynthSummary(out=out, n_train=n_train, n_test=n_test, positives=positives)
