"""The one progress signature: `progress(stage, done, total)`, in work units (images, files, tasks).

Every long library call (build, stats, verify, synth, predict) takes an optional callback of this
shape; the CLI passes one tqdm bar per stage. The library never draws anything itself.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


class Counter:
    """Adds up increments of one stage and reports the running total; a no-op without a callback."""

    def __init__(self, progress: ProgressFn | None, stage: str, total: int) -> None:
        self.progress, self.stage, self.total, self.done = progress, stage, total, 0

    def add(self, k: int) -> None:
        self.done += k
        if self.progress is not None:
            self.progress(self.stage, self.done, self.total)
