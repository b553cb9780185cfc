"""Running a stage's tasks, locally or on a dask.distributed cluster, with progress.

This is the only module that knows about Dask. Stage functions are plain Python over plain
data; callers hand `Executor.map` a list of (function, args) calls and get results back in
order. Each call should be a batch of thousands of images: a Dask task costs ~0.2-1 ms.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

import dask
from dask.callbacks import Callback

from ..errors import OutOfSpace, PcamPrepError, TaskFailed
from ..files import is_out_of_space
from ..memory import keep_freed_memory
from ..progress import ProgressFn

logger = logging.getLogger(__name__)

LOCAL_SCHEDULERS = ("threads", "processes", "sync", "local")  # local: a dask.distributed LocalCluster of our own


class _Tally:
    """Work units (e.g. images) done per progress bar; a task counts towards its own bar's total."""

    def __init__(self, bars: list[str], units: list[int], progress: ProgressFn) -> None:
        self.progress, self.done, self.total = progress, dict.fromkeys(bars, 0), dict.fromkeys(bars, 0)
        for bar, unit in zip(bars, units):
            self.total[bar] += unit
        for bar, total in self.total.items():
            progress(bar, 0, total)

    def finished(self, bar: str, unit: int) -> None:
        self.done[bar] += unit
        self.progress(bar, self.done[bar], self.total[bar])


class _TaskCounter(Callback):
    """Reports finished top-level tasks of a local dask run to a _Tally."""

    def __init__(self, tasks: dict, tally: _Tally) -> None:
        super().__init__()
        self.tasks, self.tally = tasks, tally  # key -> (bar, units)

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        if key in self.tasks:
            self.tally.finished(*self.tasks[key])


class Guarded:
    """One call of a task function, failing as one line naming its stage and what it was working on.

    The call carries its own arguments, so Dask sees a task with none: `dask.delayed(f)(*args)`
    walks every list, tuple and dataclass in the arguments looking for dask collections, and on
    the shard plan (thousands of ids and paths per task) that walk cost the driver seconds at
    100k images, before a single task ran.

    Expected failures (PcamPrepError: a changed source, a bad shard) pass through as they are;
    a full disk becomes OutOfSpace naming the file; anything else becomes TaskFailed, carrying
    the worker's traceback for `-vv` and OUT/build.log. Picklable: it travels to workers.
    """

    def __init__(self, stage: str, func: Callable[..., Any], args: tuple = ()) -> None:
        self.stage, self.func, self.args = stage, func, args

    def __call__(self) -> Any:
        args = self.args
        try:
            return self.func(*args)
        except PcamPrepError:
            raise
        except Exception as exc:
            what = describe_args(args)
            if is_out_of_space(exc):
                raise OutOfSpace(f"no space left on the device while writing {what}") from None
            raise TaskFailed(f"{self.stage} failed on {what}: {type(exc).__name__}: {exc}",
                             traceback.format_exc()) from None


def describe_args(args: tuple) -> str:
    """What a task works on, for an error line: its output path, or the files it reads."""
    for arg in args:
        if isinstance(arg, (str, os.PathLike)) and os.path.sep in str(arg):
            return str(arg)
        if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], (str, os.PathLike)):
            return f"{len(arg)} files from {arg[0]}" if len(arg) > 1 else str(arg[0])
        paths = getattr(arg, "paths", None)
        if paths:
            return f"{len(paths)} files from {paths[0]}"
    return "one of its tasks"


def init_worker(preload: tuple[str, ...] = ()) -> None:
    """Per-worker setup: reusable freed memory, single-threaded BLAS, modules imported early.

    Each worker already is one of N parallel lanes; letting OpenBLAS start its own threads
    in every worker oversubscribes the cores (its threads spin while waiting), which made
    two workers slower than one here.
    """
    keep_freed_memory()
    if threading.current_thread() is threading.main_thread():  # dask.distributed runs this on a worker thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle: no traceback per worker
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    for module in preload:  # imported while the driver scans, not inside the first task
        importlib.import_module(module)


class Executor(AbstractContextManager):
    """Run batches of delayed tasks on the configured scheduler."""

    def __init__(self, scheduler: str | None, workers: int, progress: ProgressFn | None = None,
                 preload: tuple[str, ...] = ()) -> None:
        # Processes by default: the per-file work is short Python steps between GIL-releasing
        # calls, and two threads measured slower than one process here.
        self.scheduler = scheduler or ("processes" if workers > 1 else "sync")
        self.workers = workers
        self.progress = progress
        self.client = self.cluster = None
        self.timings: dict[str, float] = {}  # wall seconds per stage, for run.json
        self.pool: ProcessPoolExecutor | None = None
        if self.scheduler == "local":
            self.cluster, self.client = _local_cluster(workers, preload)
        elif self.scheduler == "processes":  # the driver: 4 MB kept, not 64 (-20 MB of its peak at 277k images)
            keep_freed_memory(trim_above=4 * 1024 * 1024)
        elif self.scheduler in LOCAL_SCHEDULERS:
            keep_freed_memory()
        else:
            self.client = _connect(self.scheduler)
        if self.scheduler == "processes":
            self.pool = ProcessPoolExecutor(workers, mp_context=_process_context(), initializer=init_worker,
                                            initargs=(preload,))
            try:
                # Start the workers now, while this process is small: forked later (at the first task,
                # after the scan) each would inherit the whole inventory, and RSS would grow with it.
                self.pool.submit(int).result()
            except BaseException:
                self.pool.shutdown(wait=False, cancel_futures=True)
                raise
        self._limits = None
        if self.scheduler == "threads":
            from threadpoolctl import threadpool_limits

            self._limits = threadpool_limits(1)  # the worker threads are the parallelism

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self._limits is not None:
            self._limits.restore_original_limits()

    @property
    def description(self) -> str:
        if self.cluster is not None:
            return f"dask.distributed LocalCluster, {self.workers} worker process(es)"
        if self.client is not None:
            return f"dask.distributed at {self.scheduler}"
        return f"dask {self.scheduler} scheduler, {self.workers} worker(s)"

    def map(self, stage: str, calls: Sequence[tuple[Callable[..., Any], tuple]],
            units: Sequence[int] | None = None, bars: Sequence[str] | None = None) -> list[Any]:
        """Run `func(*args)` for each (func, args) in `calls` as one Dask task each; results in order.

        `units` weighs each task for progress (e.g. its number of images; default 1 each), and
        `bars` names the progress bar each task counts towards (default: `stage`), so tasks of
        different outputs run together yet each output's bar counts its own images. Tasks start
        in list order (put long ones first). Arguments must be plain data (paths, arrays, frozen
        dataclasses), never open handles.
        """
        if not calls:
            return []
        tasks: list[Any] = []
        for i, (func, args) in enumerate(calls):
            # dask.order breaks ties by key, highest first (dask 2026.8): names count down so list order wins
            key = f"{stage}-{len(calls) - 1 - i:07d}-{uuid.uuid4().hex[:8]}"
            tasks.append(dask.delayed(Guarded(stage, func, tuple(args)), pure=False)(dask_key_name=key))
        units = list(units) if units is not None else [1] * len(tasks)
        bars = list(bars) if bars is not None else [stage] * len(tasks)
        start = time.perf_counter()
        try:
            return self._run(tasks, units, bars)
        finally:
            self.timings[stage] = round(time.perf_counter() - start, 4)

    def _run(self, tasks: Sequence[Any], units: list[int], bars: list[str]) -> list[Any]:
        tally = _Tally(bars, units, self.progress or (lambda *_: None))
        if self.client is not None:
            return self._run_distributed(tasks, units, bars, tally)
        kwargs: dict[str, Any] = {"scheduler": self.scheduler}
        if self.pool is not None:
            kwargs["pool"] = self.pool
        elif self.scheduler == "threads":
            kwargs["num_workers"] = self.workers
        with _TaskCounter({t.key: (b, u) for t, b, u in zip(tasks, bars, units)}, tally):
            # Each task an output of its own: the local scheduler hands results back from the driver's cache. Under
            # one root task (a gather) every result went to a worker and back, pickled twice: at 277k images the
            # decode reports (30 MB) made that round trip ~180 MB of the driver's heap peak.
            return list(dask.compute(*tasks, **kwargs))

    def _run_distributed(self, tasks: Sequence[Any], units: list[int], bars: list[str], tally: _Tally) -> list[Any]:
        from dask.distributed import as_completed

        futures = self.client.compute(list(tasks))
        weight = {f.key: (b, u) for f, b, u in zip(futures, bars, units)}
        for future in as_completed(futures):
            tally.finished(*weight[future.key])
        return self.client.gather(futures)


def _process_context() -> multiprocessing.context.BaseContext:
    """fork when it is safe (no other threads yet): workers start in ms instead of re-importing."""
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _local_cluster(workers: int, preload: tuple[str, ...]):
    """A LocalCluster of `workers` single-threaded processes, set up like the processes scheduler's pool."""
    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    try:
        client = Client(cluster)
        client.run(init_worker, preload)  # our own workers: tune them like the pool's (never to a shared cluster)
    except BaseException:
        cluster.close()
        raise
    return cluster, client


def _connect(address: str):
    try:
        from dask.distributed import Client
    except ImportError:  # pragma: no cover - distributed is a declared dependency
        raise PcamPrepError("--scheduler ADDRESS needs dask.distributed installed") from None
    if "://" not in address:
        raise PcamPrepError(
            f"--scheduler {address!r}: expected one of {', '.join(LOCAL_SCHEDULERS)} or an address like tcp://host:8786"
        )
    try:
        return Client(address, timeout="10s")
    except (OSError, TimeoutError) as exc:
        raise PcamPrepError(f"cannot reach dask scheduler at {address}: {exc}") from None
