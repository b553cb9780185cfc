"""The sweep figure: best val AUC against each searched parameter, plus Optuna's parameter importances.

Drawn from SWEEP/trials.csv and SWEEP/best.json alone (no Optuna needed), so `stats --report
--run SWEEP` works on a copied sweep folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..figures import figure as _figure
from ..figures import save as _save

NOT_PARAMS = {"trial", "state", "best_val_auc", "epochs", "seconds", "run"}
STATE_COLOURS = {"complete": "tab:blue", "pruned": "tab:orange"}


def plot_trials(rows: list[dict[str, Any]], importances: dict[str, float] | None, path: Path) -> Path:
    """One panel per parameter (log x for ranges spanning 10x or more), and importances as bars when known."""
    params = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in NOT_PARAMS]
    scored = [r for r in rows if _number(r.get("best_val_auc")) is not None]
    panels = len(params) + bool(importances)
    fig = _figure(3.2 * max(1, panels), 3.2)
    axes = np.atleast_1d(fig.subplots(1, max(1, panels)))
    for ax, name in zip(axes, params):
        values = [r.get(name) for r in scored]
        numeric = [_number(v) for v in values]
        if numeric and all(v is not None for v in numeric):
            x = np.array(numeric, dtype=float)
            if x.min() > 0 and x.max() / x.min() >= 10:
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in values})
            x = np.array([labels.index(str(v)) for v in values], dtype=float)
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        colours = [STATE_COLOURS.get(r.get("state"), "gray") for r in scored]
        ax.scatter(x, [float(r["best_val_auc"]) for r in scored], c=colours, s=28)
        ax.set(title=name, ylabel="best val AUC" if ax is axes[0] else None)
    if importances:
        ax = axes[-1]
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:green")
        ax.set(title="parameter importance", xlim=(0, 1))
    if not params:
        axes[0].text(0.5, 0.5, "no trials yet", ha="center", va="center")
    return _save(fig, path)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
