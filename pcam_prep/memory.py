"""Memory habits of the hot loops: glibc malloc settings and per-thread scratch buffers.

On these VMs a fresh page costs ~10 us to fault in, more than decoding the image on it, so
hot loops reuse buffers and freed blocks are kept for reuse rather than returned to the OS.
"""

from __future__ import annotations

import ctypes
import mmap
import threading

import numpy as np

M_TRIM_THRESHOLD, M_MMAP_MAX, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -4, -3, -8  # glibc mallopt parameters


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt, malloc_trim); None elsewhere, where nothing is tuned."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_malloc(settings: dict[int, int]) -> None:
    """glibc mallopt(parameter, value) for each setting, in order; a no-op on other C libraries."""
    libc = _glibc()
    if libc is None:
        return
    for parameter, value in settings.items():
        libc.mallopt(parameter, value)


def keep_freed_memory(trim_above: int = 64 * 1024 * 1024) -> None:
    """Ask glibc to keep freed blocks for reuse instead of returning them to the OS.

    Builds allocate and free many multi-MB buffers (image blocks, codec output). By default
    glibc maps each one fresh; keeping them makes the second block as cheap as a memset.
    `trim_above`: how much freed heap is kept before glibc returns the rest (a driver whose
    workers run the hot loops keeps little: what it frees is its inventory's temporaries).
    """
    tune_malloc({
        M_MMAP_THRESHOLD: 32 * 1024 * 1024,
        M_ARENA_MAX: 2,  # zarr's codec threads would each grow an arena of their own
        M_TRIM_THRESHOLD: trim_above,
    })


def release_freed_memory() -> None:
    """Hand freed heap back to the OS now (glibc malloc_trim): between stages, where the driver's
    per-image temporaries are gone and the next stage would otherwise stack its own on top."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], zeroed: bool = False) -> np.ndarray:
    """A per-thread uint8 buffer of `shape`, reused across calls: one block of memory per name, grown as needed.

    Any shape that fits reuses the block (a worker writing train and test shards, whose rows differ
    in length, keeps one tar buffer, not one per layout: 14.5 MB a worker at 512 rows). `zeroed`
    buffers are zero-filled when made and whenever the row shape changes: callers that always write
    the same byte ranges of a row (tar blocks) keep their padding zero without clearing it again.
    """
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    need = int(np.prod(shape, dtype=np.int64))
    flat, rows = buffers.get(name, (None, None))
    if flat is None or len(flat) < need:
        buffers.pop(name, None)
        flat = None  # the old block is freed before the new one is made, not after
        flat = (np.zeros if zeroed else np.empty)(need, np.uint8)
    elif zeroed and rows != tuple(shape[1:]):
        flat[:] = 0  # the old rows' bytes would sit in the new rows' padding
    buffers[name] = (flat, tuple(shape[1:]))
    return flat[:need].reshape(shape)


def page_buffer(name: str, nbytes: int) -> np.ndarray:
    """A per-thread, page-aligned uint8 buffer of exactly `nbytes`, reused across calls (O_DIRECT needs
    aligned memory; an anonymous mapping is aligned and its pages, once touched, stay ours)."""
    buffers = getattr(_local, "pages", None)
    if buffers is None:
        buffers = _local.pages = {}
    buf = buffers.get(name)
    if buf is None or len(buf) != nbytes:
        buf = buffers[name] = np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)
    return buf
