"""The project's own error types: what the CLI shows as one line, without a traceback."""


class PcamPrepError(Exception):
    """A problem with the user's inputs or options; the CLI shows it without a traceback."""

    exit_code = 1


class Refused(PcamPrepError):
    """The command would not start (another build holds OUT, not enough space): exit status 2, nothing touched."""

    exit_code = 2


class SourceChanged(PcamPrepError):
    """A source file was modified between inspection and writing."""


class OutOfSpace(PcamPrepError):
    """The disk or quota filled while writing; the message names the file and says a rerun resumes."""


class TaskFailed(PcamPrepError):
    """An unexpected error inside a build task: one line naming the stage and its files, the traceback kept."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message, details)
        self.details = details  # the worker's formatted traceback

    def __str__(self) -> str:
        return str(self.args[0])
