from __future__ import annotations

from pathlib import Path

import pytest

from pcam_prep.pipeline import build
from pcam_prep.pipeline.config import BuildConfig
from pcam_prep.synth import write_kaggle


@pytest.fixture(scope="session")
def kaggle_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic competition folder: 150 train, 40 test."""
    root = tmp_path_factory.mktemp("kaggle")
    write_kaggle(root, 150, 40, seed=3)
    return root


@pytest.fixture(scope="session")
def built(kaggle_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All three formats built from `kaggle_src` with small shards, so folds span several."""
    out = tmp_path_factory.mktemp("built")
    build(BuildConfig(src=kaggle_src, out=out, shard_size=16, chunk_rows=8, folds=3, seed=1, workers=2))
    return out
