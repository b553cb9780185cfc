"""Pieces every command module shares: error translation and progress bars."""

from __future__ import annotations

import functools
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from ..errors import PcamPrepError


def set_verbosity(ctx: click.Context, verbose: int) -> None:
    """-v info, -vv debug; the most -v given anywhere on the command line wins."""
    root = ctx.find_root()
    root.obj = root.obj or {}
    root.obj["verbose"] = max(root.obj.get("verbose", 0), verbose)
    level = logging.WARNING - 10 * min(root.obj["verbose"], 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)


def add_verbose_option(group: click.Group) -> None:
    """Give every sub-command its own -v/--verbose, so it may come after the command name too."""
    for command in group.commands.values():
        command.params.append(click.Option(
            ["-v", "--verbose"], count=True, expose_value=False, is_eager=True,
            callback=lambda ctx, param, value: set_verbosity(ctx, value) if value else None,
            help="Log more (-v info, -vv debug)."))
        if isinstance(command, click.Group):
            add_verbose_option(command)


INTERRUPTED = {  # what Ctrl-C leaves behind, per command
    "build": "interrupted: nothing is lost; rerun the same command to resume from the finished shards",
    "synth": "interrupted: rerun the same command to write the rest",
}


def friendly_errors(func: Callable) -> Callable:
    """PcamPrepError, OS errors on the user's paths and Ctrl-C become one line and an exit status."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt as exc:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the rest of the shutdown is not interrupted again
            message = str(exc) or INTERRUPTED.get(func.__name__, "interrupted")
            click.echo(f"\n{message}", err=True)
            raise click.exceptions.Exit(130) from None
        except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None
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

    def __init__(self, unit: str = "task", units: dict[str, str] | None = None) -> None:
        self.unit, self.units = unit, units or {}  # units: per-stage overrides, e.g. {"md5": "MiB"}
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=f"{stage:>8}", unit=self.units.get(stage, self.unit),
                                          disable=None, file=sys.stderr, leave=True, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


SCHEDULER_HELP = ("processes (the default: measured fastest here) | threads | sync | local (a dask.distributed "
                  "LocalCluster of --workers processes) | tcp://HOST:PORT (an existing dask.distributed cluster)")


def counts_text(counts: dict[str, int]) -> str:
    """'exact: 2, train-test: 1,234': a manifest count table on one line."""
    return ", ".join(f"{k}: {v:,}" for k, v in counts.items())


def qc_lines(qc: dict[str, Any] | None) -> list[str]:
    """'QC flags  centre-background: train 12, test 3; ...' (kept images), and what --drop-flags removed."""
    if not qc:
        return []
    flagged = {flag: {split: c["count"] for split, c in entry["kept"].items() if c["count"]}
               for flag, entry in qc["flags"].items()}
    parts = [f"{flag}: " + ", ".join(f"{split} {n:,}" for split, n in counts.items())
             for flag, counts in flagged.items() if counts]
    lines = [f"QC flags  {'; '.join(parts)}  (kept; see qc.csv)" if parts else "QC flags  none"]
    if qc["dropped"]["count"]:
        lines.append(f"QC dropped {qc['dropped']['count']:,}  ({counts_text(qc['dropped']['by_flag'])}; --drop-flags, "
                     "listed in rejects.csv)")
    return lines
