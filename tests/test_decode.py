import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pcam_prep.pipeline.executor import describe_args
from pcam_prep.sources.decode import Reject, TiffDecoder
from pcam_prep.sources.kaggle import Files, PackedPaths
from pcam_prep.sources.validate import inspect_batch

from .corpus import ENCODINGS, SHAPE, image, write_bad, write_encoding


@pytest.mark.parametrize("name", sorted(ENCODINGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_every_encoding_decodes_bit_exact(tmp_path: Path, name: str, seed: int) -> None:
    img = image(seed)
    path = write_encoding(tmp_path / f"{name}.tif", img, name)
    decoder = TiffDecoder(SHAPE)
    data = path.read_bytes()
    np.testing.assert_array_equal(decoder.decode(data), img)
    np.testing.assert_array_equal(decoder.decode(data), img)  # second time: the cached layout, if any


def test_fast_path_is_taken_for_standard_files_and_matches_tifffile(tmp_path: Path) -> None:
    decoder = TiffDecoder(SHAPE)
    for seed in range(5):
        path = tmp_path / f"{seed}.tif"
        tifffile.imwrite(path, image(seed))
        np.testing.assert_array_equal(decoder.decode(path.read_bytes()), tifffile.imread(path))
    assert sum(len(v) for v in decoder._layouts.values()) == 1  # one layout learned, then reused


def test_cached_layout_never_applies_to_a_different_header(tmp_path: Path) -> None:
    decoder = TiffDecoder(SHAPE)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, image(0))
    decoder.decode(plain.read_bytes())
    # same size file, but a flipped header byte: must not be sliced blindly
    data = bytearray(plain.read_bytes())
    data[2] ^= 0xFF
    with pytest.raises(Reject):
        decoder.decode(bytes(data))


def test_bad_files_are_rejected_with_their_reason(tmp_path: Path) -> None:
    cases = write_bad(tmp_path)
    stems = sorted(cases)
    report = inspect_batch([str(tmp_path / f"{s}.tif") for s in stems], SHAPE)
    got = dict(zip(stems, report.reasons))
    assert got == {s: cases[s] for s in stems}
    assert not report.ok.any()


def test_keep_blank_keeps_black_and_white(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "b.tif", np.zeros(SHAPE, np.uint8))
    report = inspect_batch([str(tmp_path / "b.tif")], SHAPE, keep_blank=True)
    assert report.ok.all()


def test_missing_file_is_an_io_error_not_a_crash(tmp_path: Path) -> None:
    report = inspect_batch([str(tmp_path / "nope.tif")], SHAPE)
    assert report.reasons == ["io-error"]


def test_packed_paths_read_the_same_rows_as_the_paths_did(tmp_path: Path) -> None:
    """Kaggle rows carry their paths packed (prefix + one buffer); every part reads back the same files,
    names that are not UTF-8 included, and a task error still names a file."""
    folders = [tmp_path / "a", tmp_path / "b\udcff"]  # a byte that is not UTF-8, as os.scandir returns it
    paths, images = [], []
    for i in range(7):
        folders[i % 2].mkdir(exist_ok=True)
        path = folders[i % 2] / f"{i:02d}{'x' * i}.tif"
        tifffile.imwrite(path, image(i))
        paths.append(str(path))
        images.append(image(i))
    stamps = np.array([(os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths], np.int64)
    files = pickle.loads(pickle.dumps(Files(PackedPaths.of(paths), stamps)))
    assert files.paths.tolist() == paths and [files.paths[i] for i in range(-7, 7)] == paths + paths
    for start, stop in [(0, 7), (1, 4), (3, 3), (6, 7), (5, 99)]:
        part = files.part(start, stop)
        assert part.paths.tolist() == paths[start:stop] and len(part) == len(paths[start:stop])
        got = [img for _, block in part.blocks(SHAPE, 2) for img in block]
        np.testing.assert_array_equal(np.array(got).reshape(-1, *SHAPE), np.array(images[start:stop]).reshape(-1, *SHAPE))
    assert describe_args((files,)) == f"7 files from {paths[0]}"
    with pytest.raises(IndexError):
        files.paths[7]
    assert PackedPaths.of([]).tolist() == [] and PackedPaths.of(paths[:1]).tolist() == paths[:1]
