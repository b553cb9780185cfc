"""pcam-prep: Kaggle Histopathologic Cancer Detection / PCam patches -> checked, sharded datasets.

The public API, imported lazily so that `import pcam_prep` stays cheap and the trainer never
pulls in Dask:

    from pcam_prep import build, BuildConfig, open_source, BatchLoader, verify
"""

from .errors import PcamPrepError

__version__ = "0.1.0"

__all__ = ["BatchLoader", "BuildConfig", "PcamPrepError", "build", "open_source", "verify"]

_API = {
    "build": ("pcam_prep.pipeline", "build"),
    "BuildConfig": ("pcam_prep.pipeline", "BuildConfig"),
    "open_source": ("pcam_prep.loader", "open_source"),
    "BatchLoader": ("pcam_prep.loader", "BatchLoader"),
    "verify": ("pcam_prep.verify", "verify"),
}


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'pcam_prep' has no attribute {name!r}")
    import importlib

    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
