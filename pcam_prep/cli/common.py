"""Pieces every command module shares: error translation and progress bars."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from ..errors import PcamPrepError


def friendly_errors(func: Callable) -> Callable:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PcamPrepError as exc:
            details = getattr(exc, "details", "")
            context = click.get_current_context(silent=True)
            if details and context is not None and (context.find_root().obj or {}).get("verbose", 0) >= 2:
                click.echo(details, err=True)  # -vv: the worker's traceback too
            error = click.ClickException(str(exc))
            error.exit_code = exc.exit_code  # 2: refused before starting (busy OUT, no space)
            raise error from None

    return wrapper


class Bars:
    """tqdm bars keyed by stage; silent when stderr is not a terminal."""

    def __init__(self, unit: str = "task") -> None:
        self.unit = unit
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=f"{stage:>8}", unit=self.unit, disable=None,
                                          file=sys.stderr, leave=True, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


SCHEDULER_HELP = ("processes (the default: measured fastest here) | threads | sync | local (a dask.distributed "
                  "LocalCluster of --workers processes) | tcp://HOST:PORT (an existing dask.distributed cluster)")
