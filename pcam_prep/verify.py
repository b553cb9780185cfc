"""`pcam-prep verify`: prove a built folder is what its manifest says it is.

Three independent checks: every file re-hashed against the manifest; counts agree between
the manifest, the shards and the arrays; and every format decodes to the same pixels, labels
and ids, sample by sample (all of them by default, or a random `sample`). The torchvision
PCAM files, when built, must have exactly the names, keys, shapes and dtypes torchvision reads,
and the same pixels and labels row for row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import PcamPrepError
from .files import sha256_file, sha256_tree
from .loader import FORMATS, Source, open_source, split_spec
from .manifest import read_manifest, safe_relpath
from .progress import ProgressFn
from .schema import TORCHVISION_DIR, torchvision_name

logger = logging.getLogger(__name__)
CHUNK = 512


@dataclass
class VerifyReport:
    files: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(out: Path, sample: int | None = None, seed: int = 0,
           progress: ProgressFn | None = None) -> VerifyReport:
    """Check `out` against its manifest; problems name the file or sample at fault."""
    out = Path(out)
    manifest = read_manifest(out)
    report = VerifyReport()
    check_files(out, manifest, report, progress)
    formats = [f for f in FORMATS if any(e["format"] == f for e in manifest["files"])]
    for split in manifest["splits"]:
        sources = {}
        for fmt in formats:
            try:
                sources[fmt] = open_source(out, split, None, fmt, mapped=False)  # HDF5 through h5py itself
            except PcamPrepError as exc:
                report.problems.append(f"{fmt} {split}: {exc}")
        check_counts(manifest, split, sources, report)
        if sources:
            check_samples(split, sources, sample, seed, report, progress)
        check_torchvision(out, manifest, split, next(iter(sources.values()), None), _rows(
            manifest["splits"][split]["count"], sample, seed), report)
    return report


def check_files(out: Path, manifest: dict, report: VerifyReport, progress) -> None:
    entries = manifest["files"]
    for done, entry in enumerate(entries, start=1):
        path = safe_relpath(out, entry["path"])
        if not path.exists():
            report.problems.append(f"missing file: {entry['path']}")
            continue
        digest = sha256_tree(path) if path.is_dir() else sha256_file(path)
        if digest != entry["sha256"]:
            report.problems.append(f"checksum mismatch: {entry['path']} (manifest {entry['sha256'][:12]}…, "
                                   f"file {digest[:12]}…)")
        report.files += 1
        if progress:
            progress("hash", done, len(entries))


def check_counts(manifest: dict, split: str, sources: dict[str, Source], report: VerifyReport) -> None:
    expected = manifest["splits"][split]["count"]
    for fmt, source in sources.items():
        if len(source) != expected:
            report.problems.append(f"{fmt} {split}: {len(source)} samples, manifest says {expected}")
    if split_spec(manifest, split).folded and "wds" in sources:
        per_fold = {c["fold"]: c["count"] for c in manifest["folds"]["counts"]}
        for fold, count in per_fold.items():
            got = sum(e["count"] for e in manifest["files"] if e["format"] == "wds" and e["fold"] == fold)
            if got != count:
                report.problems.append(f"wds fold {fold}: shards hold {got} samples, manifest says {count}")


def check_samples(split: str, sources: dict[str, Source], sample: int | None, seed: int,
                  report: VerifyReport, progress) -> None:
    """Every format must give the same ids, labels and pixels, row for row."""
    names = list(sources)
    first = sources[names[0]]
    for name in names[1:]:
        other = sources[name]
        if len(other) != len(first) or list(other.ids) != list(first.ids):
            report.problems.append(f"{split}: ids differ between {names[0]} and {name}")
            return
        if first.labels is not None and not np.array_equal(first.labels, other.labels):
            row = int(np.flatnonzero(first.labels != other.labels)[0])
            report.problems.append(f"{split}: label of sample {first.ids[row]} differs between {names[0]} and {name}")
    rows = _rows(len(first), sample, seed)
    for done, start in enumerate(range(0, len(rows), CHUNK), start=1):
        index = rows[start : start + CHUNK]
        try:
            pixels = {name: sources[name].take(index) for name in names}
        except PcamPrepError as exc:  # e.g. a Zarr shard whose index fails its checksum
            report.problems.append(f"{split}: {exc}")
            return
        reference = pixels[names[0]]
        for name in names[1:]:
            bad = np.flatnonzero((pixels[name] != reference).reshape(len(index), -1).any(axis=1))
            for row in index[bad][:5]:
                report.problems.append(f"{split}: pixels of sample {first.ids[row]} (row {row}) differ between "
                                       f"{names[0]} and {name}")
        report.samples += len(index)
        if progress:
            progress(f"{split} px", done, -(-len(rows) // CHUNK))


def _rows(n: int, sample: int | None, seed: int) -> np.ndarray:
    rows = np.arange(n)
    if sample is not None and sample < n:
        rows = np.sort(np.random.default_rng(seed).choice(rows, sample, replace=False))
    return rows


def check_torchvision(out: Path, manifest: dict, split: str, reference: Source | None, rows: np.ndarray,
                      report: VerifyReport) -> None:
    """torchvision PCAM files of `split`: x (N,H,W,3) and y (N,1,1,1) uint8, equal to `reference` row for row."""
    if not any(e["format"] == "torchvision-h5" and e["split"] == split for e in manifest["files"]):
        return
    import h5py

    n, shape = manifest["splits"][split]["count"], tuple(manifest["image_shape"])
    x_path, y_path = (out / TORCHVISION_DIR / torchvision_name(split, m) for m in ("x", "y"))
    try:
        with h5py.File(x_path, "r") as fx, h5py.File(y_path, "r") as fy:
            x, y = fx.get("x"), fy.get("y")
            for name, data, want in (("x", x, (n, *shape)), ("y", y, (n, 1, 1, 1))):
                if not isinstance(data, h5py.Dataset) or data.shape != want or data.dtype != np.uint8:
                    found = "missing" if not isinstance(data, h5py.Dataset) else f"{data.shape} {data.dtype}"
                    report.problems.append(f"torchvision {split}: {name!r} is {found}, expected {want} uint8")
                    return
            if reference is None:
                return
            if reference.labels is not None and not np.array_equal(y[:].reshape(n), reference.labels):
                report.problems.append(f"torchvision {split}: labels differ from the other formats")
            for start in range(0, len(rows), CHUNK):
                index = rows[start : start + CHUNK]
                contiguous = index[-1] - index[0] + 1 == len(index)
                pixels = x[index[0] : index[-1] + 1] if contiguous else x[index]
                bad = np.flatnonzero((pixels != reference.take(index)).reshape(len(index), -1).any(axis=1))
                for row in index[bad][:5]:
                    report.problems.append(f"torchvision {split}: pixels of row {row} differ from the other formats")
    except OSError as exc:
        report.problems.append(f"torchvision {split}: cannot read: {exc}")
