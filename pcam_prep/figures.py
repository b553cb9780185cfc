"""Figures with matplotlib's object API (`Figure`, rendered by Agg): no pyplot, no global figure
state, no GUI backend. Shared by the trainer's run figures and the `stats` report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import tmp_path

DPI = 110


def figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save(fig: Any, path: Path) -> Path:
    """Write `fig` as a PNG atomically; no version stamp, so the same data gives the same bytes."""
    path = Path(path)
    tmp = tmp_path(path)
    fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    tmp.replace(path)
    return path
