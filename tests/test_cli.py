from pathlib import Path

import pytest
from click.testing import CliRunner

from pcam_prep.cli import main


def commands():
    return sorted(main.commands)


@pytest.mark.parametrize("name", commands())
def test_every_command_documents_itself_with_an_example(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output


def test_synth_then_build_from_the_train_folder(tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(main, ["synth", str(tmp_path / "src"), "--train", "40", "--test", "10", "--seed", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["build", "--src", str(tmp_path / "src" / "train"), "--out", str(tmp_path / "out"),
                                  "--formats", "wds,zarr", "--folds", "2", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "40" in result.output
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert not (tmp_path / "out" / "pcam.h5").exists()


def test_config_file_is_read_and_flags_win(tmp_path: Path):
    runner = CliRunner()
    runner.invoke(main, ["synth", str(tmp_path / "src"), "--train", "30", "--test", "0"])
    spec = tmp_path / "spec.toml"
    spec.write_text(f'[build]\nsrc = "{tmp_path / "src"}"\nout = "{tmp_path / "out"}"\nfolds = 3\nformats = ["hdf5"]\n')
    result = runner.invoke(main, ["build", "--config", str(spec), "--folds", "2", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "2 folds" in result.output
    assert (tmp_path / "out" / "pcam.h5").exists() and not (tmp_path / "out" / "wds").exists()


@pytest.mark.parametrize("args,message", [
    (["--formats", "wds,parquet"], "unknown format"),
    (["--folds", "0"], "folds must be a positive integer"),
    (["--scheduler", "nonsense"], "expected one of"),
])
def test_bad_options_name_the_bad_value(tmp_path: Path, args, message):
    runner = CliRunner()
    runner.invoke(main, ["synth", str(tmp_path / "src"), "--train", "5", "--test", "0"])
    result = runner.invoke(main, ["build", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_labels_csv_is_a_clear_error(tmp_path: Path):
    (tmp_path / "train").mkdir()
    result = CliRunner().invoke(main, ["build", "--src", str(tmp_path / "train"), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "labels CSV not found" in result.output


def test_strict_exits_3_when_something_was_rejected(tmp_path: Path):
    runner = CliRunner()
    runner.invoke(main, ["synth", str(tmp_path / "src"), "--train", "10", "--test", "0"])
    (tmp_path / "src" / "train" / "junk.tif").write_bytes(b"junk")
    result = runner.invoke(main, ["build", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                                  "--strict", "--workers", "1", "--formats", "wds"])
    assert result.exit_code == 3, result.output


def test_verify_command_passes_then_fails_on_a_flipped_byte(built: Path, tmp_path: Path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(built, out)
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(out)])
    assert ok.exit_code == 0 and ok.output.startswith("OK"), ok.output
    h5 = out / "pcam.h5"
    data = bytearray(h5.read_bytes())
    data[-5000] ^= 0x10
    h5.write_bytes(bytes(data))
    bad = runner.invoke(main, ["verify", str(out)])
    assert bad.exit_code == 1
    assert "pcam.h5" in bad.output
