"""Stain maths: numpy reference fits, the batched torch transforms, and their use by train/predict/stats.

The colour conversions are checked against scikit-image (rgb2hed, hed2rgb, rgb2lab); the torch
Macenko estimate against the numpy one; awkward patches (white, black, grey, one colour) must
pass through every transform unchanged and never produce NaN.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner
from skimage import color as skimage_color

from pcam_prep import PcamPrepError
from pcam_prep import stain
from pcam_prep.cli import main
from pcam_prep.synth.kaggle import make_patch
from pcam_prep.train.config import TrainConfig
from pcam_prep.train.data import Normalise
from pcam_prep.train.stain import (
    StainNormaliser,
    hed_jitter,
    hed_perturb,
    hed_to_rgb,
    lab_to_rgb,
    macenko_stains,
    masked_percentiles,
    optical_density,
    read_reference_file,
    rgb_to_hed,
    rgb_to_lab,
    tissue_mask,
)

CPU = torch.device("cpu")
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _patches(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([make_patch(rng, i % 2, 96)[0] for i in range(n)])


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    return _patches(8, 11)


def _unit(images: np.ndarray, device: torch.device = CPU) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255


def _pixels(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 3)


NO_TISSUE = {  # every transform must leave these exactly as they are
    "white": np.full((96, 96, 3), 255, np.uint8),
    "black": np.zeros((96, 96, 3), np.uint8),
    "grey": np.full((96, 96, 3), 128, np.uint8),
    "near-white": np.random.default_rng(0).integers(238, 256, (96, 96, 3), dtype=np.uint8),
}
ONE_COLOUR = {  # tissue-coloured, but one colour: no second stain to normalise, so normalisation leaves them
    "one-colour-pink": np.broadcast_to(np.array([230, 150, 200], np.uint8), (96, 96, 3)).copy(),
    "one-colour-purple": np.broadcast_to(np.array([90, 50, 150], np.uint8), (96, 96, 3)).copy(),
}
SPECIAL = NO_TISSUE | ONE_COLOUR


def test_colour_matrices_are_scikit_images() -> None:
    np.testing.assert_allclose(stain.RGB_FROM_HED, skimage_color.rgb_from_hed)
    np.testing.assert_allclose(stain.HED_FROM_RGB, skimage_color.hed_from_rgb, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_hed_conversions_match_scikit_image(patches: np.ndarray, device: torch.device) -> None:
    x = _pixels(_unit(patches, device)).double()
    hed = rgb_to_hed(x)
    expected = skimage_color.rgb2hed(patches).reshape(len(patches), -1, 3)
    np.testing.assert_allclose(hed.clamp_min(0).cpu().numpy(), expected, atol=1e-6)  # rgb2hed clips at 0
    np.testing.assert_allclose(hed_to_rgb(torch.from_numpy(expected).to(device)).cpu().numpy(),
                               skimage_color.hed2rgb(expected), atol=1e-9)
    np.testing.assert_allclose(hed_to_rgb(hed).cpu().numpy(), x.cpu().numpy(), atol=1e-9)  # unclipped: inverts


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_lab_conversions_match_scikit_image(patches: np.ndarray, device: torch.device) -> None:
    expected = skimage_color.rgb2lab(patches)
    np.testing.assert_allclose(stain.rgb_to_lab(patches), expected, atol=1e-6)
    x = _pixels(_unit(patches, device)).double()
    lab = rgb_to_lab(x)
    np.testing.assert_allclose(lab.cpu().numpy(), expected.reshape(len(patches), -1, 3), atol=1e-4)
    np.testing.assert_allclose(lab_to_rgb(lab).cpu().numpy(), x.cpu().numpy(), atol=1e-6)


def test_hed_perturb_is_scikit_images_deconvolution_jittered(patches: np.ndarray) -> None:
    alpha, beta = torch.tensor([[[1.04, 0.97, 1.02]]]), torch.tensor([[[0.01, -0.02, 0.005]]])
    image = patches[:1]
    x = _unit(image).double()
    out = hed_perturb(x, alpha.double(), beta.double())[0].permute(1, 2, 0).numpy()
    hed = skimage_color.rgb2hed(image[0])
    expected = skimage_color.hed2rgb(hed * alpha.numpy()[0] + beta.numpy()[0])
    tissue = stain.tissue_pixels(image[0]) & (hed > 0).all(-1)  # where rgb2hed's clipping changes nothing
    assert tissue.mean() > 0.5
    np.testing.assert_allclose(out[tissue], expected[tissue], atol=1e-6)
    background = ~stain.tissue_pixels(image[0])
    np.testing.assert_array_equal(out[background], x[0].permute(1, 2, 0).numpy()[background])


def test_tissue_rule_is_the_same_in_numpy_and_torch(patches: np.ndarray) -> None:
    images = np.concatenate([patches, np.stack(list(SPECIAL.values()))])
    mask = tissue_mask(_pixels(_unit(images)).double()).numpy()
    np.testing.assert_array_equal(mask, stain.tissue_pixels(images).reshape(len(images), -1))
    assert not mask[len(patches) : len(patches) + len(NO_TISSUE)].any()
    assert mask[len(patches) + len(NO_TISSUE) :].all()


def test_masked_percentiles_follow_numpy() -> None:
    rng = np.random.default_rng(0)
    values, mask = rng.normal(size=(5, 300)), rng.random((5, 300)) < 0.4
    mask[4] = False  # an empty row: finite, whatever it is
    got = masked_percentiles(torch.from_numpy(values), torch.from_numpy(mask), (1.0, 50.0, 99.0)).numpy()
    for row in range(4):
        np.testing.assert_allclose(got[row], np.percentile(values[row][mask[row]], [1, 50, 99]), atol=1e-12)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_batched_macenko_equals_the_numpy_fit_per_image(patches: np.ndarray, device: torch.device) -> None:
    x = _pixels(_unit(patches, device)).double()
    stains, valid = macenko_stains(optical_density(x), tissue_mask(x))
    assert valid.all()
    for i, image in enumerate(patches):
        expected = stain.macenko_stains(stain.optical_density(image[stain.tissue_pixels(image)]))
        np.testing.assert_allclose(stains[i].cpu().numpy(), expected, atol=1e-6)
    synth_od = np.array([[1.10, 1.45, 0.55], [0.10, 0.41, 0.24]])  # the synthetic haematoxylin, eosin
    synth_od /= np.linalg.norm(synth_od, axis=1, keepdims=True)
    assert (np.einsum("bij,ij->bi", stains.cpu().numpy(), synth_od) > 0.98).all()  # H first, then E


@pytest.mark.parametrize("method", stain.METHODS)
@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_patches_without_tissue_pass_through_unchanged(patches: np.ndarray, method: str,
                                                       device: torch.device) -> None:
    normalise = StainNormaliser(stain.fit_reference(patches, method, "patches"), device)
    images = np.concatenate([patches[:3], np.stack(list(SPECIAL.values()))])
    x = _unit(images, device)
    out = normalise(x)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out[3:], x[3:], rtol=0, atol=0)
    assert (out[:3] - x[:3]).abs().mean() > 1e-3  # tissue does change
    jittered = hed_jitter(x, torch.Generator(device).manual_seed(0), 0.05)
    assert torch.isfinite(jittered).all()
    background = slice(3, 3 + len(NO_TISSUE))  # one-colour tissue is jittered like any other tissue
    torch.testing.assert_close(jittered[background], x[background], rtol=0, atol=0)


@pytest.mark.parametrize("method", stain.METHODS)
def test_a_batch_normalises_each_image_on_its_own(patches: np.ndarray, method: str) -> None:
    normalise = StainNormaliser(stain.fit_reference(patches[:2], method, "patches"), CPU)
    x = _unit(patches)
    together = normalise(x)
    for i in range(len(patches)):
        torch.testing.assert_close(together[i : i + 1], normalise(x[i : i + 1]), atol=1e-5, rtol=0)


def _stained(images: np.ndarray, h_gain: float, e_gain: float) -> np.ndarray:
    """The same tissue under another stain strength (Ruifrok deconvolution, scaled, recombined)."""
    hed = skimage_color.rgb2hed(images)
    return np.round(skimage_color.hed2rgb(hed * np.array([h_gain, e_gain, 1.0])) * 255).astype(np.uint8)


def test_macenko_maps_a_restained_image_back_onto_the_reference(patches: np.ndarray) -> None:
    reference = stain.fit_reference(patches, "macenko", "patches")
    shifted = _stained(patches, 1.6, 0.6)
    out = StainNormaliser(reference, CPU)(_unit(shifted))
    back = np.round(out.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    before = stain.fit_reference(shifted, "macenko", "shifted")
    after = stain.fit_reference(back, "macenko", "normalised")
    error = lambda fit: np.abs(np.array(fit["max_conc"]) - reference["max_conc"]).max()  # noqa: E731
    assert error(after) < 0.25 * error(before)
    np.testing.assert_allclose(after["stains"], reference["stains"], atol=0.05)


def test_reinhard_gives_the_reference_lab_moments(patches: np.ndarray) -> None:
    reference = stain.fit_reference(patches[:1], "reinhard", "patch")
    out = StainNormaliser(reference, CPU)(_unit(_stained(patches[1:2], 1.5, 0.7)).double())
    lab = stain.rgb_to_lab(np.round(out.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8))[0]
    tissue = lab[tissue_mask(_pixels(out)).numpy()[0].reshape(96, 96)]
    np.testing.assert_allclose(tissue.mean(0), reference["lab_mean"], atol=1.5)
    np.testing.assert_allclose(tissue.std(0), reference["lab_std"], rtol=0.1)


def test_hed_jitter_replays_from_its_generator_and_grows_with_sigma(patches: np.ndarray) -> None:
    x = _unit(patches)
    once, again = (hed_jitter(x, torch.Generator().manual_seed(3), 0.05) for _ in range(2))
    torch.testing.assert_close(once, again, rtol=0, atol=0)
    change = [(hed_jitter(x, torch.Generator().manual_seed(3), s) - x).abs().mean().item() for s in (0.01, 0.05)]
    assert 0 < change[0] < change[1]


@pytest.mark.parametrize("method", stain.METHODS)
@pytest.mark.parametrize("name", ["white", "black", "near-white", "one-colour-pink"])
def test_a_reference_without_tissue_is_a_clear_error(name: str, method: str) -> None:
    if name in ONE_COLOUR and method == "reinhard":
        pytest.skip("one colour still has LAB moments; only Macenko needs two stains")
    with pytest.raises(PcamPrepError, match=f"^the {name} patch(:| holds no tissue)"):
        stain.fit_reference(SPECIAL[name][None], method, f"the {name} patch")


@pytest.mark.parametrize("suffix", [".npy", ".tif", ".png"])
def test_reference_files_read_back(tmp_path: Path, patches: np.ndarray, suffix: str) -> None:
    path = tmp_path / f"ref{suffix}"
    if suffix == ".npy":
        np.save(path, patches[0])
    elif suffix == ".tif":
        tifffile.imwrite(path, patches[0])
    else:
        from matplotlib.image import imsave

        imsave(path, patches[0])  # writes RGBA
    np.testing.assert_array_equal(read_reference_file(path), patches[:1])


def test_stain_settings_are_checked() -> None:
    with pytest.raises(PcamPrepError, match="--stain-ref x"):
        TrainConfig(shards=Path("."), stain_ref="x")
    with pytest.raises(PcamPrepError, match="stain_norm"):
        TrainConfig(shards=Path("."), stain_norm="vahadane")
    with pytest.raises(PcamPrepError, match="stain_sigma"):
        TrainConfig(shards=Path("."), stain_augment="hed", stain_sigma=0)


TINY = ["--device", "cpu", "--width", "4", "--batch-size", "16", "--epochs", "1"]


def test_train_refuses_a_reference_without_tissue(built: Path, tmp_path: Path) -> None:
    white = tmp_path / "white.npy"
    np.save(white, SPECIAL["white"])
    result = CliRunner().invoke(main, ["train", "--shards", str(built), "--out", str(tmp_path / "run"), *TINY,
                                       "--stain-norm", "macenko", "--stain-ref", str(white)])
    assert result.exit_code == 1
    assert f"--stain-ref {white} holds no tissue" in result.output
    result = CliRunner().invoke(main, ["train", "--shards", str(built), "--out", str(tmp_path / "run"), *TINY,
                                       "--stain-norm", "reinhard", "--stain-ref", "no-such-id"])
    assert result.exit_code == 1 and "no train image" in result.output and "no-such-id" in result.output


@pytest.mark.slow
def test_predict_applies_the_checkpoints_stain_reference(built: Path, tmp_path: Path) -> None:
    from pcam_prep.loader import open_source

    first = str(open_source(built, "train", None).ids[0])
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--shards", str(built), "--out", str(run), *TINY,
                                       "--stain-norm", "macenko", "--stain-ref", first, "--stain-augment", "hed"])
    assert result.exit_code == 0, result.output
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["stain"]["method"] == "macenko" and first in ckpt["stain"]["source"]
    assert Normalise.from_checkpoint(ckpt, CPU).stain is not None
    plain = run / "no-stain.pt"
    torch.save({**ckpt, "stain": None}, plain)
    probs = {}
    for name, path in (("stain", run / "best.pt"), ("plain", plain)):
        out = tmp_path / f"{name}.csv"
        result = CliRunner().invoke(main, ["predict", "--shards", str(built), "--checkpoint", str(path),
                                           "--out", str(out), "--device", "cpu", "--split", "val"])
        assert result.exit_code == 0, result.output
        probs[name] = np.loadtxt(out, delimiter=",", skiprows=1, usecols=2)
    assert np.abs(probs["stain"] - probs["plain"]).max() > 1e-4  # the reference changes what the model sees


@pytest.fixture(scope="module")
def lab_shift(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """`stats` of one synthetic folder as written, and with its test split restained (pipelines/restain.py)."""
    import subprocess
    import sys

    from pcam_prep.eda import EdaOptions, collect
    from pcam_prep.synth import write_kaggle

    script = Path(__file__).resolve().parents[1] / "pipelines" / "restain.py"
    found = {}
    for name in ("same", "shifted"):
        root = tmp_path_factory.mktemp(f"stain-{name}")
        write_kaggle(root, 90, 60, seed=4)
        if name == "shifted":
            subprocess.run([sys.executable, str(script), str(root), "--split", "test"], check=True, timeout=120)
        found[name] = collect(root, EdaOptions(workers=1, stain_sample=64, seed=2)).summary["stain"]
    return found


def test_stats_stain_object_per_split_and_fold(lab_shift: dict[str, dict]) -> None:
    same = lab_shift["same"]
    assert set(same["splits"]) == {"train", "test"} and same["basis"]["from"] == "train sample (Macenko)"
    assert set(same["train_folds"]) == {"0", "1", "2", "3", "4"}
    assert sum(f["patches"] for f in same["train_folds"].values()) == same["splits"]["train"]["patches"] == 64
    for part in [*same["splits"].values(), *same["train_folds"].values()]:
        assert np.isclose(np.linalg.norm(part["H"]), 1, atol=1e-3) and part["H"][0] > part["E"][0]
        pct = part["concentration_percentiles"]
        assert pct["H"]["p1"] <= pct["H"]["p50"] <= pct["H"]["p99"]


def test_stats_sees_a_restained_test_split(lab_shift: dict[str, dict]) -> None:
    angle = {name: found["splits"]["test"]["angle_to_train_deg"] for name, found in lab_shift.items()}
    print(f"\nangle to train: {angle}")
    assert max(angle["same"].values()) < 2.5  # synth draws train and test from one stain distribution
    assert max(angle["shifted"].values()) > 2 * max(angle["same"].values())
    median = {name: found["splits"]["test"]["concentration_percentiles"]["H"]["p50"] /
              found["splits"]["train"]["concentration_percentiles"]["H"]["p50"] for name, found in lab_shift.items()}
    assert abs(median["same"] - 1) < abs(median["shifted"] - 1)


def test_stats_report_draws_the_stain_figure_and_can_skip_it(built: Path, tmp_path: Path) -> None:
    from pcam_prep.cli.stats import stats

    result = CliRunner().invoke(stats, [str(built), "--report", str(tmp_path / "report"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "stain.png").read_bytes().startswith(b"\x89PNG")
    assert 'src="stain.png"' in (tmp_path / "report" / "index.html").read_text()
    assert "angle to train H/E" in result.output
    result = CliRunner().invoke(stats, [str(built), "--json", "--stain-sample", "0", "--workers", "1"])
    assert result.exit_code == 0 and '"stain": null' in result.output


@pytest.mark.slow
def test_resume_refuses_another_stain_reference(built: Path, tmp_path: Path) -> None:
    run = ["train", "--shards", str(built), "--out", str(tmp_path / "run"), *TINY]
    assert CliRunner().invoke(main, run).exit_code == 0
    result = CliRunner().invoke(main, [*run, "--epochs", "2", "--resume", "--stain-norm", "macenko"])
    assert result.exit_code == 1 and "stain_norm 'none' -> 'macenko'" in result.output
