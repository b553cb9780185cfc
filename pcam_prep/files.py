"""File utilities every layer shares: temporary names, atomic writes, sha256, "unchanged" checks."""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import itertools
import json
import os
import platform
import shutil
import threading
import time
import tomllib
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import numpy as np

from .errors import PcamPrepError, Refused, SourceChanged
from .memory import page_buffer, scratch

LOCK_NAME = ".pcam-prep.lock"  # inside OUT; held (flock) for the whole build, released by the kernel on exit

_HASH_CHUNK = 1024 * 1024


def tmp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (same folder: rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = tmp_path(path)
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_toml(path: Path, option: str) -> dict[str, Any]:
    """A TOML file as a dict; a missing or invalid file is one PcamPrepError line naming `option` and the path."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise PcamPrepError(f"{option}: {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise PcamPrepError(f"{option}: {path} is not valid TOML: {exc}") from None


def write_csv_atomic(path: Path, header: Iterable[Any], rows: Iterable[Iterable[Any]]) -> Path:
    """A CSV (header, then rows; `\\n` line ends) written under its temporary name and renamed into place."""
    path = Path(path)
    tmp = tmp_path(path)
    with open(tmp, "w", newline="") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(header)
        out.writerows(rows)
    os.replace(tmp, path)
    return path


DIRECT_ALIGN = 4096  # memory, offset and length alignment that O_DIRECT accepts on every Linux filesystem
_DIRECT_BUFFER = 8 * 1024 * 1024


def open_direct(path: Path, flags: int, direct: bool = True) -> tuple[int, bool]:
    """(fd, opened with O_DIRECT): `path` opened with O_DIRECT where asked and the filesystem takes it, else without."""
    flags |= os.O_CLOEXEC
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False


def pwrite_all(fd: int, view: memoryview, offset: int, direct: bool) -> bool:
    """Write all of `view` at `offset`; returns whether `fd` is still O_DIRECT.

    A filesystem that opens with O_DIRECT but refuses a write's alignment (EINVAL) gets the write
    buffered, and the descriptor stays buffered from then on.
    """
    while len(view):
        try:
            done = os.pwrite(fd, view, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not direct:
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            direct = False
            continue
        view, offset = view[done:], offset + done
    return direct


_local = threading.local()


def _background() -> ThreadPoolExecutor:
    """This thread's one writer thread (made once, reused by every file the thread writes)."""
    pool = getattr(_local, "writer", None)
    if pool is None:
        pool = _local.writer = ThreadPoolExecutor(1, thread_name_prefix="pcam-prep-write")
    return pool


class _Turns:
    """A thread's two page-aligned write buffers, shared by all its DirectWriters, and the disk
    write each one may still be in (a buffer is refilled only once its last write is done)."""

    def __init__(self) -> None:
        self.buffers = [page_buffer(f"direct-{i}", _DIRECT_BUFFER) for i in (0, 1)]
        self.pending: list[Future | None] = [None, None]
        self.turn = 0

    def free(self, wait_all: bool = False, raise_errors: bool = True) -> None:
        """Wait for the buffer about to be filled (or both) to be written; its write's error is raised here."""
        for i in (0, 1) if wait_all else (self.turn,):
            pending, self.pending[i] = self.pending[i], None
            if pending is not None:
                pending.result() if raise_errors else pending.exception()


def _turns() -> _Turns:
    turns = getattr(_local, "turns", None)
    if turns is None:
        turns = _local.turns = _Turns()
    return turns


@contextmanager
def write_behind() -> Iterator[None]:
    """DirectWriters closed inside this block return at once: the last disk write, the truncation
    and the close run in the writer thread, and leaving the block waits for all of them (raising
    the first error). A task that writes many small files (Zarr shards, HDF5 chunk runs) so
    overlaps each file's last write with the next file's work, instead of waiting at every close.
    """
    _local.deferred = deferred = []
    failed = True
    try:
        yield
        failed = False
    finally:
        _local.deferred = None
        turns = _turns()
        errors = [p.exception() for p in [*turns.pending, *deferred] if p is not None]  # waits for every one
        turns.pending = [None, None]
        first = next((e for e in errors if e is not None), None)
        if first is not None and not failed:
            raise first


class DirectWriter:
    """A file written through O_DIRECT where the filesystem takes it, else buffered, with the disk
    write of one buffer running in a thread while the caller fills the next.

    Why: on these VMs a page-cache page the kernel has not used yet costs more to fill than the
    disk costs to write (dd: ~400 MB/s buffered into fresh pages, ~2 GB/s with O_DIRECT), and a
    build's outputs are GBs nobody reads back at once. But a direct write blocks until the disk
    has the bytes, so two reused, page-aligned buffers per calling thread take turns: `pwrite`
    releases the GIL and the caller's decoding and hashing overlap the disk. One open writer per
    thread at a time; inside `write_behind()` its close does not wait for the disk either.
    Filesystems that refuse O_DIRECT (older tmpfs, some network mounts) get ordinary writes; the
    bytes are the same either way.

    `write` appends from offset 0 of a new file (the last write padded to the alignment, the file
    truncated to its true length at close); `write_at` puts one block of at most BUFFER bytes at a
    given offset of an existing file (`create=False`), as HDF5 chunk ranges are filled.
    """

    BUFFER = _DIRECT_BUFFER

    def __init__(self, path: Path, direct: bool = True, create: bool = True):
        flags = os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if create else 0)
        self.fd, self.direct = open_direct(path, flags, direct)
        self.turns = _turns()
        self.turns.free()
        self.fill = 0
        self.size = 0  # bytes given to write()
        self.written = 0  # bytes in the file: `size` rounded up to the alignment after the last flush
        self.appended = False

    def write(self, data) -> None:
        self.appended = True
        view = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        while len(view):
            buf = self.turns.buffers[self.turns.turn]
            n = min(len(view), len(buf) - self.fill)
            buf[self.fill : self.fill + n] = view[:n]
            self.fill += n
            self.size += n
            view = view[n:]
            if self.fill == len(buf):
                self._flush()

    def write_at(self, data, offset: int) -> None:
        """`data` (at most BUFFER bytes) at byte `offset`; with O_DIRECT, offset and length must be aligned."""
        view = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        if self.appended or len(view) > _DIRECT_BUFFER:
            raise ValueError(f"write_at takes one block of at most {_DIRECT_BUFFER} bytes, not mixed with write()")
        self.turns.buffers[self.turns.turn][: len(view)] = view
        self.fill = len(view)
        self._submit(offset)

    def _flush(self) -> None:
        n = self.fill
        if self.direct and n % DIRECT_ALIGN:
            padded = n + (-n % DIRECT_ALIGN)
            self.turns.buffers[self.turns.turn][n:padded] = 0
            self.fill = padded
        offset, self.written = self.written, self.written + self.fill
        self._submit(offset)

    def _submit(self, offset: int) -> None:
        turns = self.turns
        view = memoryview(turns.buffers[turns.turn])[: self.fill]
        turns.pending[turns.turn] = _background().submit(pwrite_all, self.fd, view, offset, self.direct)
        turns.turn ^= 1
        turns.free()  # the next buffer to fill: its write (issued before this one) must be done
        self.fill = 0

    def close(self, flush: bool = True) -> None:
        if self.fd < 0:
            return
        if not flush:  # a failure is being raised already: only let the writes into fd finish
            fd, self.fd = self.fd, -1
            self.turns.free(wait_all=True, raise_errors=False)
            os.close(fd)
            return
        if self.fill:
            try:
                self._flush()
            except BaseException:
                self.close(flush=False)
                raise
        fd, self.fd = self.fd, -1
        size = self.size if self.appended else None
        deferred = getattr(_local, "deferred", None)
        if deferred is None:
            self.turns.free(wait_all=True)
            _finish(fd, size)
        else:  # after this file's writes in the writer thread's queue; write_behind waits for it
            deferred.append(_background().submit(_finish, fd, size))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(flush=exc_type is None)  # after a failure the partial file is dropped, not completed


def _finish(fd: int, size: int | None) -> None:
    """Close a written file, first cutting an appended file's last aligned write back to its true length."""
    try:
        if size is not None and os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def sha256_file(path: Path, direct: bool = False) -> str:
    return hash_file(path, "sha256", direct)[1]


def hash_file(path: Path, algorithm: str, direct: bool = False) -> tuple[int, str]:
    """(size in bytes, hex digest) of a file, streamed through reused buffers.

    `direct` is for big files this process family wrote with O_DIRECT: they are read with O_DIRECT
    too (where the filesystem allows) into two aligned buffers, the next read running in a thread
    while the last one is hashed, so the file neither passes through fresh page-cache pages nor
    waits for the disk between hash calls.
    """
    digest = hashlib.new(algorithm, usedforsecurity=False)  # integrity checks, not security: md5 stays allowed
    if direct:
        return _hash_direct(path, digest)
    buf = scratch("hash", (_HASH_CHUNK,))  # one reused buffer: fresh pages per read cost more than hashing
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
            size += n
    return size, digest.hexdigest()


def _hash_direct(path: Path, digest) -> tuple[int, str]:
    fd, _ = open_direct(path, os.O_RDONLY)
    buffers = [page_buffer(f"hash-{i}", _DIRECT_BUFFER) for i in (0, 1)]
    size = 0
    try:
        reader = _background()
        pending = reader.submit(os.preadv, fd, [buffers[0]], 0)
        for turn in itertools.count():
            n = pending.result()
            if not n:
                break
            size += n
            pending = reader.submit(os.preadv, fd, [buffers[(turn + 1) % 2]], size)
            digest.update(memoryview(buffers[turn % 2])[:n])  # hashlib releases the GIL: the read overlaps
    finally:
        os.close(fd)
    return size, digest.hexdigest()


def tree_files(root: Path) -> list[str]:
    """Every file below `root`, as sorted posix paths relative to it."""
    found = []
    for dirpath, _, filenames in os.walk(root):
        found += [(Path(dirpath) / name).relative_to(root).as_posix() for name in filenames]
    return sorted(found)


def sha256_tree(root: Path, known: dict[str, str] | None = None) -> str:
    """One digest for a directory store: sha256 over sorted `relpath\\0filehash\\n` lines.

    `known` holds digests already computed (by the tasks that wrote those files).
    """
    known = known or {}
    lines = [f"{rel}\0{known.get(rel) or sha256_file(root / rel)}\n" for rel in tree_files(root)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def file_stamp(path: str | Path) -> tuple[int, int]:
    """(size, mtime_ns): what "this source file is unchanged" is judged by."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def check_unchanged(path: str | Path, stamp: tuple[int, int], now: tuple[int, int] | None = None) -> None:
    """Raise SourceChanged unless `path` still has the (size, mtime_ns) it had at inspection."""
    now = tuple(now) if now is not None else file_stamp(path)
    if now != tuple(stamp):
        raise SourceChanged(f"{path} changed while the build was running (size/mtime {tuple(stamp)} -> {now}); "
                            "run the build again to pick up the new content")


@contextmanager
def exclusive_folder(out: Path, what: str = "pcam-prep build") -> Iterator[Path]:
    """Hold OUT's lock file for the block: one writer per folder, released by the kernel if the process dies.

    A second holder is refused at once (`Refused`, exit status 2) with the first one's pid, host
    and start time, before anything in OUT is touched. The lock file is never removed: removing
    it would let a third process lock a new file while the second still holds the old one.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Refused(f"{out} is being built by another {what} ({_holder(fd)}); wait for it or use another --out") \
                from None
        holder = json.dumps({"pid": os.getpid(), "host": platform.node(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder, 0)
        yield out
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (ValueError, KeyError):
        return "holder unknown"


def build_in_progress(out: Path) -> str | None:
    """'pid N on HOST since TIME' when a build holds OUT's lock right now, else None."""
    try:
        fd = os.open(Path(out) / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_out_of_space(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when a library (h5py, zarr) wraps it and keeps only the message."""
    if isinstance(exc, OSError) and exc.errno in OUT_OF_SPACE:
        return True
    text = str(exc)
    return isinstance(exc, OSError) and ("No space left on device" in text or "Disk quota exceeded" in text)


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
