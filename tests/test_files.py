"""files.DirectWriter: the same bytes as a plain buffered write, whatever the sizes of the pieces."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from pcam_prep.files import DIRECT_ALIGN, DirectWriter, hash_file, write_behind


def pieces(seed: int) -> list[bytes]:
    """Odd sizes on both sides of the alignment and of the writer's 8 MiB buffer, and empty ones."""
    rng = np.random.default_rng(seed)
    sizes = [0, 1, DIRECT_ALIGN - 1, DIRECT_ALIGN, 28_160 * 3, 9 * 1024 * 1024 + 17, 0, 511, 5]
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]


@pytest.mark.parametrize("direct", [True, False])
def test_direct_writes_are_byte_identical_to_buffered_ones(tmp_path: Path, direct: bool) -> None:
    parts = pieces(1)
    path = tmp_path / "out.bin"
    with DirectWriter(path, direct=direct) as fh:
        for part in parts:
            fh.write(part)
        fh.write(np.arange(1000, dtype=np.int64))  # any buffer, not only bytes
    expected = b"".join(parts) + np.arange(1000, dtype=np.int64).tobytes()
    assert os.path.getsize(path) == len(expected)
    assert path.read_bytes() == expected


def test_a_file_of_exact_buffer_multiples_and_an_empty_file(tmp_path: Path) -> None:
    block = bytes(range(256)) * (DIRECT_ALIGN // 256) * 2048  # exactly one 8 MiB buffer
    with DirectWriter(tmp_path / "two.bin") as fh:
        fh.write(block)
        fh.write(block)
    assert (tmp_path / "two.bin").read_bytes() == block * 2
    with DirectWriter(tmp_path / "empty.bin"):
        pass
    assert (tmp_path / "empty.bin").stat().st_size == 0


def test_a_failure_inside_the_block_leaves_the_buffered_tail_unwritten(tmp_path: Path) -> None:
    path = tmp_path / "partial.bin"
    with pytest.raises(RuntimeError), DirectWriter(path) as fh:
        fh.write(b"x" * 100)
        raise RuntimeError("stop")
    assert path.stat().st_size == 0  # the caller drops the partial file; nothing pretends to be whole


@pytest.mark.parametrize("size", [0, 1, 4095, 8 * 1024 * 1024, 8 * 1024 * 1024 + 1, 20_000_123])
def test_hashing_with_direct_reads_gives_the_plain_digest(tmp_path: Path, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)  # buffered and maybe still dirty: the direct read must see it all the same
    assert hash_file(path, "sha256", direct=True) == (size, hashlib.sha256(data).hexdigest())
    assert hash_file(path, "sha256") == (size, hashlib.sha256(data).hexdigest())


def test_blocks_written_at_offsets_of_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "chunks.bin"
    path.write_bytes(bytes(5 * DIRECT_ALIGN * 4))
    blocks = {o * DIRECT_ALIGN * 4: bytes([o + 1]) * (DIRECT_ALIGN * 4) for o in (3, 0, 4)}
    with DirectWriter(path, create=False) as fh:
        for offset, block in blocks.items():
            fh.write_at(block, offset)
    data = path.read_bytes()
    assert len(data) == 5 * DIRECT_ALIGN * 4
    for offset, block in blocks.items():
        assert data[offset : offset + len(block)] == block
    assert data[DIRECT_ALIGN * 4 : 3 * DIRECT_ALIGN * 4] == bytes(2 * DIRECT_ALIGN * 4)


def test_a_full_disk_surfaces_from_the_background_write_as_enospc(tmp_path: Path) -> None:
    """/dev/full fails every write with ENOSPC: the error reaches the caller, not a lost thread."""
    with pytest.raises(OSError) as caught, DirectWriter(Path("/dev/full"), direct=False, create=False) as fh:
        fh.write(bytes(DirectWriter.BUFFER * 3))
    assert caught.value.errno == errno.ENOSPC


def test_files_closed_inside_write_behind_are_whole_once_it_exits(tmp_path: Path) -> None:
    parts = pieces(2)
    with write_behind():
        for i, part in enumerate(parts):  # many files, each closed without waiting for its last write
            with DirectWriter(tmp_path / f"{i}.bin") as fh:
                fh.write(part)
                fh.write(part[:100])
        with DirectWriter(tmp_path / "at.bin") as fh:  # a file of another size, through the same two buffers
            fh.write(bytes(range(256)) * 64)
    for i, part in enumerate(parts):
        assert (tmp_path / f"{i}.bin").read_bytes() == part + part[:100]
    assert (tmp_path / "at.bin").read_bytes() == bytes(range(256)) * 64


def test_a_full_disk_inside_write_behind_is_raised_by_the_block(tmp_path: Path) -> None:
    with pytest.raises(OSError) as caught, write_behind():
        with DirectWriter(Path("/dev/full"), direct=False, create=False) as fh:
            fh.write(bytes(1000))  # one small write: it fails only in the writer thread, after close returned
        with DirectWriter(tmp_path / "next.bin") as fh:
            fh.write(bytes(10))
    assert caught.value.errno == errno.ENOSPC


def test_tar_blocks_are_the_same_bytes_whatever_layout_came_before() -> None:
    """One reused buffer serves train (labelled) and test rows; switching layouts leaves no old bytes in the
    padding. Each block is compared with the same block encoded in a fresh thread (a fresh buffer)."""
    import threading

    from pcam_prep.schema import SampleLayout
    from pcam_prep.writers.wds import encode_block

    rng = np.random.default_rng(0)
    blocks = []
    for labelled, n in [(True, 3), (False, 5), (True, 4), (False, 2)]:
        images = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        args = (SampleLayout((96, 96, 3), labelled), [f"id{i:03d}" for i in range(n)], images,
                rng.integers(0, 2, n).astype(np.uint8) if labelled else None)
        blocks.append((args, encode_block(*args).tobytes()))
    for args, reused in blocks:
        fresh: list[bytes] = []
        thread = threading.Thread(target=lambda a=args, out=fresh: out.append(encode_block(*a).tobytes()))
        thread.start()
        thread.join()
        assert reused == fresh[0]
