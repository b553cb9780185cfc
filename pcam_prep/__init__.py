"""pcam-prep: Kaggle Histopathologic Cancer Detection / PCam patches -> checked, sharded datasets."""

__version__ = "0.1.0"


class PcamPrepError(Exception):
    """A problem with the user's inputs or options; the CLI shows it without a traceback."""
