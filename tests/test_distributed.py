"""The same build on a real dask.distributed cluster (scheduler + 2 workers on 127.0.0.1)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pcam_prep.pipeline import build
from pcam_prep.pipeline.config import BuildConfig

pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    info = folder / "scheduler.json"
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    scheduler = subprocess.Popen([*dask, "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                  "--scheduler-file", str(info)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [scheduler]
    try:
        deadline = time.monotonic() + 60
        while not info.exists():
            assert time.monotonic() < deadline, "dask scheduler did not start"
            time.sleep(0.1)
        address = json.loads(info.read_text())["address"]
        worker = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "2", "--nthreads", "1",
                  "--no-dashboard", "--local-directory", str(folder / "workers")]
        procs.append(subprocess.Popen(worker, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.slow
def test_cluster_build_is_byte_identical_to_a_local_build(cluster: str, kaggle_src: Path, built: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "on-cluster"
    summary = build(BuildConfig(src=kaggle_src, out=out, shard_size=16, chunk_rows=8, folds=3, seed=1,
                                scheduler=cluster, batch_size=40))
    local = {f["path"]: f["sha256"] for f in json.loads((built / "manifest.json").read_text())["files"]}
    remote = {f["path"]: f["sha256"] for f in summary.manifest["files"]}
    assert remote == local
    assert "distributed" in json.loads((out / "run.json").read_text())["scheduler"]
    shutil.rmtree(out)


@pytest.mark.slow
def test_unreachable_scheduler_is_a_clear_error(kaggle_src: Path, tmp_path: Path) -> None:
    from pcam_prep import PcamPrepError

    with pytest.raises(PcamPrepError, match="cannot reach dask scheduler"):
        build(BuildConfig(src=kaggle_src, out=tmp_path / "x", scheduler="tcp://127.0.0.1:9"))
