"""The torchvision `PCAM` file names and keys: ROOT/pcam/camelyonpatch_level_2_split_{split}_{x,y}.h5.

torchvision.datasets.PCAM(root, split) opens `x` (N, 96, 96, 3) uint8 and `y` (N, 1, 1, 1)
uint8 with h5py and reads one row per sample, so the datasets are contiguous and unfiltered:
a row is one small read, and no HDF5 plugin is needed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..files import tmp_path


def write_pair(x_path: Path, y_path: Path, shape: tuple[int, ...], labels: np.ndarray,
               blocks: Iterable[tuple[int, np.ndarray]]) -> None:
    """Write the x and y files of one split atomically; `blocks` yields (start, images) in row order."""
    import h5py

    n = len(labels)
    _write(y_path, "y", np.asarray(labels, np.uint8).reshape(n, 1, 1, 1))
    tmp = tmp_path(x_path)
    with h5py.File(tmp, "w", libver=("v110", "v110"), track_order=False) as fh:
        x = fh.create_dataset("x", shape=(n, *shape), dtype=np.uint8, track_times=False)
        for start, images in blocks:
            x[start : start + len(images)] = images
    os.replace(tmp, x_path)


def _write(path: Path, key: str, data: np.ndarray) -> None:
    import h5py

    tmp = tmp_path(path)
    with h5py.File(tmp, "w", libver=("v110", "v110"), track_order=False) as fh:
        fh.create_dataset(key, data=data, track_times=False)
    os.replace(tmp, path)
