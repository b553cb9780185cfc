"""Interruption, resumption and verification (issue: builds that lose nothing)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr

from pcam_prep.pipeline import build
from pcam_prep.pipeline.config import BuildConfig
from pcam_prep.schema import SampleLayout
from pcam_prep.sources.decode import Reject, read_file
from pcam_prep.synth import write_kaggle
from pcam_prep.verify import verify


def digests(out: Path) -> dict[str, str]:
    return {f["path"]: f["sha256"] for f in json.loads((out / "manifest.json").read_text())["files"]}


@pytest.fixture(scope="module")
def bigger_src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bigger")
    write_kaggle(root, 600, 40, seed=9)
    return root


def test_sigkill_mid_build_then_rerun_is_byte_identical(bigger_src: Path, tmp_path: Path) -> None:
    args = ["--src", str(bigger_src), "--shard-size", "8", "--chunk-rows", "8", "--scheduler", "sync"]
    reference = tmp_path / "reference"
    build(BuildConfig(src=bigger_src, out=reference, shard_size=8, chunk_rows=8, scheduler="sync"))

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pcam_prep", "build", "--out", str(out), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((out / "wds").glob("*.tar"))) < 5:
        assert proc.poll() is None, "build finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()  # an interrupted folder never looks whole
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "wds").glob("*.tar")}

    build(BuildConfig(src=bigger_src, out=out, shard_size=8, chunk_rows=8, scheduler="sync"))
    assert digests(out) == digests(reference)
    kept = [n for n, t in finished.items() if (out / "wds" / n).stat().st_mtime_ns == t]
    assert kept, "finished shards should have been reused, not rewritten"
    assert not list(out.rglob("*.partial"))
    assert verify(out).ok


def test_a_corrupted_finished_shard_is_rewritten_not_reused(bigger_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = BuildConfig(src=bigger_src, out=out, formats=("wds",), shard_size=64, workers=1)
    build(config)
    before = digests(out)
    shard = sorted((out / "wds").glob("train-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[SampleLayout((96, 96, 3), True).pixel_offset + 100] ^= 0xFF
    shard.write_bytes(bytes(data))
    build(config)
    assert digests(out) == before
    # the manifest alone could be right while the file is not: hash what is on disk
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == before[f"wds/{shard.name}"]
    assert verify(out).ok


def test_verify_catches_a_flipped_pixel_and_names_file_and_sample(built: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(built, out)
    assert verify(out).ok
    shard = sorted((out / "wds").glob("train-f1-*.tar"))[0]
    layout = SampleLayout((96, 96, 3), True)
    data = bytearray(shard.read_bytes())
    data[2 * layout.stride + layout.pixel_offset + 5] ^= 0x01  # third sample, one pixel byte
    shard.write_bytes(bytes(data))
    report = verify(out)
    assert not report.ok
    assert any(f"checksum mismatch: wds/{shard.name}" in p for p in report.problems)
    assert any("pixels of sample" in p and "differ between wds and zarr" in p for p in report.problems)


def test_verify_catches_a_changed_label_in_zarr(built: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(built, out)
    y = zarr.open_array(str(out / "pcam.zarr"), path="train/y", mode="r+")
    y[0] = 1 - y[0]
    report = verify(out, sample=10)
    assert any("label of sample" in p for p in report.problems)
    assert any("checksum mismatch: pcam.zarr" in p for p in report.problems)


def test_verify_refuses_manifest_paths_outside_out(built: Path, tmp_path: Path) -> None:
    import shutil

    from pcam_prep import PcamPrepError

    out = tmp_path / "copy"
    shutil.copytree(built, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][0]["path"] = "../../etc/passwd"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PcamPrepError, match="outside"):
        verify(out)


def test_outputs_carry_no_wall_clock_time(built: Path) -> None:
    shard = sorted((built / "wds").glob("*.tar"))[0]
    import tarfile

    with tarfile.open(shard) as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in tar.getmembers()} == {(0, 0, 0, "", "")}
    text = (built / "manifest.json").read_text()
    assert "finished_unix" not in text and "seconds" not in text
    assert "finished_unix" in (built / "run.json").read_text()


def test_links_and_folders_in_train_are_rejected_and_never_followed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_kaggle(src, 20, 2, seed=4)
    outside = tmp_path / "outside"
    write_kaggle(outside, 1, 0, seed=5)
    target = next((outside / "train").glob("*.tif"))
    (src / "train" / target.name).symlink_to(target)  # a link out of SRC, with a labels row
    (src / "train" / "nested.tif").mkdir()
    (src / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are ignored, not rejected
    os.mkfifo(src / "train" / "pipe.tif")  # opening it would block: it must never be opened
    labels = (src / "train_labels.csv").read_text() + f"{target.stem},1\n"
    (src / "train_labels.csv").write_text(labels)
    summary = build(BuildConfig(src=src, out=tmp_path / "out", formats=("wds",), workers=1))
    rejects = {r["id"]: (r["reason"], r["detail"]) for r in csv.DictReader((tmp_path / "out" / "rejects.csv").open())}
    assert rejects == {target.stem: ("not-regular", f"symbolic link {target.name}"),
                       "nested": ("not-regular", "folder nested.tif"), "pipe": ("not-regular", "special file pipe.tif")}
    for path, detail in ((src / "train" / target.name, "symbolic link"), (src / "train" / "pipe.tif", "regular")):
        with pytest.raises(Reject, match="not-regular") as caught:  # even if the scan were fooled
            read_file(str(path))
        assert detail in caught.value.detail
    assert summary.manifest["splits"]["train"]["count"] == 20
