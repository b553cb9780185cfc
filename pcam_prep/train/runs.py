"""The layout of a cross-validation run folder, shared by `cv` (which writes it) and `predict --run` (which reads it).

    RUN/fold-K/            a normal `train` run folder (best.pt, last.pt, metrics.json, ...), fold K validating
    RUN/fold-K/oof.csv     id,label,fold,prob: fold K scored by its own best.pt (with TTA)
    RUN/fold-K/fold.json   written last for the fold: its AUC, speed and the build it trained on
    RUN/oof.csv, RUN/label_review.csv, RUN/cv.json   the assembled results; cv.json is written last
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import PcamPrepError

FOLD_RESULT = "fold.json"
FOLD_OOF = "oof.csv"
CV_RESULT = "cv.json"
OOF = "oof.csv"
REVIEW = "label_review.csv"
_FOLD_DIR = re.compile(r"fold-(\d+)")


def fold_dir(run: Path, fold: int) -> Path:
    return Path(run) / f"fold-{fold}"


def finished_folds(run: Path) -> dict[int, dict[str, Any]]:
    """fold -> its fold.json, for every fold of `run` whose training and scoring finished."""
    found = {}
    for path in sorted(Path(run).glob(f"fold-*/{FOLD_RESULT}")):
        match = _FOLD_DIR.fullmatch(path.parent.name)
        if match:
            try:
                found[int(match.group(1))] = json.loads(path.read_text())
            except json.JSONDecodeError:
                raise PcamPrepError(f"{path} is not valid JSON (delete its fold folder and train the fold again)") \
                    from None
    return found


def missing_folds(results: dict[int, dict[str, Any]], k: int) -> list[int]:
    return [f for f in range(k) if f not in results]


def complete_run(run: Path) -> dict[int, dict[str, Any]]:
    """Every fold's fold.json; a one-line error when `run` is not a cv run or a fold is not finished."""
    run = Path(run)
    results = finished_folds(run)
    if not results:
        raise PcamPrepError(f"{run} is not a cv run: it has no fold-K/{FOLD_RESULT} (train one with `pcam-prep cv`)")
    k = results[min(results)]["folds"]["k"]
    missing = missing_folds(results, k)
    if missing:
        listed = ",".join(map(str, missing))
        raise PcamPrepError(f"{run}: fold(s) {listed} of {k} not finished (train them with "
                            f"`pcam-prep cv --folds {listed}`, then `pcam-prep cv --collect {run}`)")
    return results


def run_checkpoints(run: Path) -> list[Path]:
    """best.pt of every fold of a finished cv run, in fold order."""
    return [fold_dir(run, fold) / "best.pt" for fold in sorted(complete_run(run))]
