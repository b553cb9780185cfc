"""The project's own error types: what the CLI shows as one line, without a traceback."""


class PcamPrepError(Exception):
    """A problem with the user's inputs or options; the CLI shows it without a traceback."""


class SourceChanged(PcamPrepError):
    """A source file was modified between inspection and writing."""
