from pathlib import Path

import numpy as np
import pytest
import tifffile

from pcam_prep.sources.decode import Reject, TiffDecoder
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
