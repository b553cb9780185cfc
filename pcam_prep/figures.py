"""Figures with matplotlib's object API (`Figure`, rendered by Agg): no pyplot, no global figure
state, no GUI backend. Shared by the trainer's run figures and the `stats` report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import tmp_path
from .schema import centre_window

DPI = 110


def figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def tile_axes(ax: Any, frame: bool = True) -> None:
    """An axes for one patch: no ticks; `frame`: a thin grey frame, so white or black patches stay visible."""
    ax.set_axis_on()
    ax.set_xticks([])
    ax.set_yticks([])
    if frame:
        for spine in ax.spines.values():
            spine.set(color="0.7", lw=0.6)


def patch_tile(ax: Any, image: Any, frame: bool = True) -> None:
    """`image` on a `tile_axes`, the PCam centre window (which decides the label) outlined in cyan."""
    from matplotlib.patches import Rectangle

    tile_axes(ax, frame)
    ax.imshow(image, interpolation="nearest")
    window = centre_window(image.shape[0])
    side = window.stop - window.start
    ax.add_patch(Rectangle((window.start - 0.5,) * 2, side, side, fill=False, lw=1.2, ec="#00e5ff"))


def save(fig: Any, path: Path) -> Path:
    """Write `fig` as a PNG atomically; no version stamp, so the same data gives the same bytes."""
    path = Path(path)
    tmp = tmp_path(path)
    fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    tmp.replace(path)
    return path
