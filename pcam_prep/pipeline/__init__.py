"""`pcam-prep build`, the build pipeline, in modules that follow the README's numbered steps.

`analyse` runs steps 1-6 (scan, decode, validate, dedup, stats, folds) with `dedup`, `folds`
and the sources' inspection; `write` plans and runs step 7 through the worker functions in
`tasks`; `card` is the manifest; `run.build` wires them; `executor` is the only module that
knows about Dask; `config` is the frozen `BuildConfig`.
"""

from .config import BuildConfig
from .run import BuildSummary, build

__all__ = ["BuildConfig", "BuildSummary", "build"]
