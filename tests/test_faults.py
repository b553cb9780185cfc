"""Faults users hit: two builds into one OUT, a full disk, a file changing underneath, noisy libraries.

Real processes (the CLI in subprocesses), real locks and a real small filesystem (tmpfs mounted
in a private mount namespace with `unshare`; skipped where that is not permitted).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pcam_prep.errors import SourceChanged, TaskFailed
from pcam_prep.files import LOCK_NAME, build_in_progress, exclusive_folder
from pcam_prep.loader import open_source
from pcam_prep.pipeline import build
from pcam_prep.pipeline.config import BuildConfig
from pcam_prep.pipeline.executor import Executor
from pcam_prep.synth import make_patch, write_kaggle
from pcam_prep.verify import verify


def cli(*args: object, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pcam_prep", *map(str, args)], capture_output=True, text=True,
                          **kwargs)


def digests(out: Path) -> dict[str, str]:
    return {f["path"]: f["sha256"] for f in json.loads((out / "manifest.json").read_text())["files"]}


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    write_kaggle(root, 400, 40, seed=12)
    return root


def test_a_second_build_into_a_locked_out_exits_2_and_touches_nothing(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build(BuildConfig(src=src, out=out, formats=("wds",), workers=1))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != LOCK_NAME}
    with exclusive_folder(out):  # held by this process, as a running build holds it
        busy = cli("build", "--src", src, "--out", out, "--formats", "wds")
        assert busy.returncode == 2, busy.stderr
        assert f"is being built by another pcam-prep build (pid {os.getpid()} on " in busy.stderr
        assert "Traceback" not in busy.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != LOCK_NAME} == before
    assert verify(out).ok


def test_two_real_builds_at_once_one_wins_and_readers_wait(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_kaggle(src, 4000, 50, seed=2)  # a first build of several seconds: the second starts while it runs
    out = tmp_path / "cc"
    first = subprocess.Popen([sys.executable, "-m", "pcam_prep", "build", "--src", str(src), "--out", str(out),
                              "--scheduler", "sync", "--shard-size", "20", "--near-duplicates"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while build_in_progress(out) is None:
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    args = [sys.executable, "-m", "pcam_prep"]
    second = subprocess.Popen([*args, "build", "--src", str(src), "--out", str(out), "--seed", "5"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader = subprocess.Popen([*args, "verify", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert first.wait(120) == 0, first.stderr.read()
    _, second_err = second.communicate(60)
    _, reader_err = reader.communicate(60)
    assert second.returncode == 2 and "is being built by another pcam-prep build (pid" in second_err, second_err
    assert reader.returncode == 1 and "is being built right now" in reader_err and "Traceback" not in reader_err
    assert cli("verify", out).returncode == 0
    assert json.loads((out / "manifest.json").read_text())["folds"]["seed"] == 0  # the first build's


def test_a_killed_build_leaves_no_stale_lock(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "pcam_prep", "build", "--src", str(src), "--out", str(out),
                             "--scheduler", "sync"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while build_in_progress(out) is None:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert build_in_progress(out) is None  # the kernel released it
    assert "no manifest.json" in cli("verify", out).stderr
    assert cli("build", "--src", src, "--out", out, "--formats", "wds").returncode == 0


SMALL_FS = """
set -u
mount -t tmpfs -o size=4m none "$MNT" || exit 99
run() { "$PY" -m pcam_prep build --src "$SRC" --out "$MNT/out" --formats wds --shard-size 40 "$@"; }
run > "$LOG/check.out" 2> "$LOG/check.err"; echo $? > "$LOG/check.rc"
run --no-space-check > "$LOG/full.out" 2> "$LOG/full.err"; echo $? > "$LOG/full.rc"
find "$MNT/out" -name '*.partial' > "$LOG/partials"
(cd "$MNT/out/wds" && for f in *.tar; do [ -e ".$f.done" ] && stat -c '%n %Y' "$f"; done) > "$LOG/finished"
mount -o remount,size=64m "$MNT"
run > "$LOG/rerun.out" 2> "$LOG/rerun.err"; echo $? > "$LOG/rerun.rc"
(cd "$MNT/out/wds" && for f in *.tar; do stat -c '%n %Y' "$f"; done) > "$LOG/after"
cp "$MNT/out/manifest.json" "$LOG/manifest.json"
"""


def test_a_small_disk_is_refused_then_fills_then_a_rerun_resumes_to_the_same_bytes(src: Path, tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed: cannot mount a small filesystem")
    reference = tmp_path / "reference"
    build(BuildConfig(src=src, out=reference, formats=("wds",), shard_size=40, workers=1))
    (tmp_path / "mnt").mkdir()
    log = tmp_path / "log"
    log.mkdir()
    env = {**os.environ, "MNT": str(tmp_path / "mnt"), "SRC": str(src), "LOG": str(log), "PY": sys.executable}
    done = subprocess.run(["unshare", "-rm", "bash", "-c", SMALL_FS], env=env, capture_output=True, text=True)
    if done.returncode == 99 or not (log / "check.rc").exists():
        pytest.skip(f"mounting a tmpfs in a private namespace is not permitted here: {done.stderr.strip()[:200]}")
    read = lambda name: (log / name).read_text().strip()  # noqa: E731
    assert read("check.rc") == "2", read("check.err")
    assert read("check.err").startswith("Error: need ~") and " free (pass --no-space-check" in read("check.err")
    assert read("full.rc") == "1", read("full.err")
    full = read("full.err")
    assert len(full.splitlines()) == 1 and "Traceback" not in full
    assert "no space left on the device while writing " in full and ".tar" in full
    assert "this build needs ~" in full and "rerun the same command" in full
    assert read("partials") == ""  # the failed piece's temporary file is gone
    assert read("rerun.rc") == "0", read("rerun.err")
    assert {f["path"]: f["sha256"] for f in json.loads(read("manifest.json"))["files"]} == digests(reference)
    finished = dict(line.split() for line in read("finished").splitlines())
    after = dict(line.split() for line in read("after").splitlines())
    # shards finished with their marker before the disk filled are kept, not rewritten (a shard whose marker
    # could not be written is redone: nothing proves it whole)
    assert finished and all(after[name] == t for name, t in finished.items())


def _tif(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, image, photometric="rgb")
    return buf.getvalue()


def _ifd_patch(data: bytes, entry: int | None, value: bytes, at: int) -> bytes:
    """`data` with bytes at `at` inside IFD entry `entry` (None: the next-IFD pointer) replaced by `value`."""
    ifd = struct.unpack("<I", data[4:8])[0]
    n = struct.unpack("<H", data[ifd : ifd + 2])[0]
    start = ifd + 2 + 12 * (n if entry is None else entry) + at
    out = bytearray(data)
    out[start : start + len(value)] = value
    return bytes(out), ifd


def test_tifffile_complaints_go_to_rejects_and_the_v_log_never_raw_to_the_terminal(tmp_path: Path) -> None:
    root = tmp_path / "src"
    write_kaggle(root, 20, 0, seed=5)
    rng = np.random.default_rng(0)
    good = _tif(make_patch(rng, 0, 96)[0])
    ifd = struct.unpack("<I", good[4:8])[0]
    looping, _ = _ifd_patch(good, None, struct.pack("<I", ifd), 0)  # next IFD = itself: tifffile logs, decodes
    bad_type, _ = _ifd_patch(good, 0, struct.pack("<H", 99), 2)  # ImageWidth of type 99: tifffile logs, rejected
    labels = (root / "train_labels.csv").read_text()
    for name, data in (("a" * 40, looping), ("b" * 40, bad_type)):
        (root / "train" / f"{name}.tif").write_bytes(data)
        labels += f"{name},0\n"
    (root / "train_labels.csv").write_text(labels)
    quiet = cli("build", "--src", root, "--out", tmp_path / "out", "--formats", "wds")
    assert quiet.returncode == 0, quiet.stderr
    assert "tifffile" not in quiet.stderr and "ERROR" not in quiet.stderr
    rejects = (tmp_path / "out" / "rejects.csv").read_text()
    assert "b" * 40 in rejects and "tifffile: " in rejects and "invalid data type 99" in rejects
    assert "a" * 40 in open_source(tmp_path / "out").ids  # the looping chain still decodes
    verbose = cli("-v", "build", "--src", root, "--out", tmp_path / "out2", "--formats", "wds")
    assert "decoded, but tifffile said: " in verbose.stderr and "circular reference" in verbose.stderr


def test_a_source_rewritten_during_the_build_stops_it_naming_the_file_and_a_rerun_uses_the_new_pixels(
        tmp_path: Path) -> None:
    root = tmp_path / "src"
    write_kaggle(root, 30, 0, seed=8)
    victim = sorted((root / "train").glob("*.tif"))[3]
    new = np.full((96, 96, 3), 0, np.uint8)
    new[::2] = 200  # not blank

    def rewrite_after_inspection(stage: str, done: int, total: int) -> None:
        if stage == "decode" and done == total:
            time.sleep(0.01)  # a new mtime even on coarse clocks
            victim.write_bytes(_tif(new))

    config = BuildConfig(src=root, out=tmp_path / "out", formats=("wds",), scheduler="sync")
    with pytest.raises(SourceChanged, match=str(victim)):
        build(config, progress=rewrite_after_inspection)
    build(config)
    source = open_source(tmp_path / "out")
    row = list(source.ids).index(victim.stem)
    np.testing.assert_array_equal(source.take(np.array([row]))[0], new)


def _boom(path: str) -> None:
    raise ValueError(f"cannot handle {os.path.basename(path)}")


def test_an_unexpected_error_in_a_worker_process_is_one_line_naming_stage_and_file(tmp_path: Path) -> None:
    with Executor("processes", 2) as executor:
        with pytest.raises(TaskFailed) as failed:
            executor.map("shards", [(_boom, (str(tmp_path / "wds" / "train-f0-000000.tar"),))])
    message = str(failed.value)
    assert message.startswith("shards failed on ") and "train-f0-000000.tar" in message
    assert "ValueError: cannot handle train-f0-000000.tar" in message and "\n" not in message
    assert "Traceback" in failed.value.details and "_boom" in failed.value.details


def _log_start(path: str, i: int) -> int:
    with open(path, "a") as fh:
        fh.write(f"{i}\n")
    return i


@pytest.mark.parametrize("scheduler", ["sync", "processes"])
def test_tasks_start_in_list_order(tmp_path: Path, scheduler: str) -> None:
    # write_outputs puts its longest task (the HDF5 hash) first; dask.order would run it last
    log = tmp_path / "started.txt"
    with Executor(scheduler, 1) as executor:
        assert executor.map("shards", [(_log_start, (str(log), i)) for i in range(12)]) == list(range(12))
    assert [int(line) for line in log.read_text().split()] == list(range(12))
