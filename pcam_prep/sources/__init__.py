"""Source layouts: the Kaggle tif folders (kaggle.py) and the official PCam HDF5 files (pcam_h5.py)."""

from __future__ import annotations

from pathlib import Path

from ..errors import PcamPrepError
from . import kaggle, pcam_h5
from .base import Inventory

LAYOUTS = ("kaggle", "pcam-h5")


def detect_layout(src: Path) -> str:
    """pcam-h5 when `src` holds camelyonpatch_level_2_split_* files, else kaggle."""
    return "pcam-h5" if pcam_h5.is_pcam_dir(src) else "kaggle"


def scan_source(config, shape: tuple[int, int, int]) -> Inventory:
    """Scan `config.src` in its layout (`config.layout`, or detected when "auto")."""
    layout = detect_layout(config.src) if config.layout == "auto" else config.layout
    if layout == "pcam-h5":
        kaggle_only = [name for name in ("labels", "test") if getattr(config, name) is not None]
        if kaggle_only:
            raise PcamPrepError(f"--{kaggle_only[0]} is for the Kaggle layout; {config.src} is read as PCam HDF5 files")
        return pcam_h5.scan(pcam_h5.resolve_layout(config.src, config.no_test), shape)
    return kaggle.scan(kaggle.resolve_layout(config.src, config.labels, config.test, config.no_test))
