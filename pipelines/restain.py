"""Simulate another lab's stain: rewrite one split of a Kaggle-layout folder with its optical density scaled.

Each channel's optical density -log((I + 1) / 256) is multiplied by its --gains (R, G, B), which
shifts both the hue of the stain vectors and the stain amounts, as a different scanner or
staining protocol would. The files are rewritten in place (ids then no longer equal the sha1 of
the pixels: `build` counts them as a warning), so run it on a copy. It is how the README's
"shifted" stain figure was made:

    pcam-prep synth demo --train 2000 --test 500 && python pipelines/restain.py demo --split test
    pcam-prep build --src demo --out shifted/ && pcam-prep stats shifted/ --report report/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile

from pcam_prep.stain import optical_density


def restain(images: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    """uint8 RGB with each channel's optical density multiplied by its gain."""
    od = optical_density(images) * np.asarray(gains)
    return np.clip(np.round(256 * np.exp(-od) - 1), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="Kaggle-layout folder (train/, test/)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--gains", type=float, nargs=3, default=(1.3, 0.85, 1.15), metavar=("R", "G", "B"))
    args = parser.parse_args()
    paths = sorted((args.root / args.split).glob("*.tif"))
    for path in paths:
        tifffile.imwrite(path, restain(tifffile.imread(path), tuple(args.gains)))
    print(f"restained {len(paths)} {args.split} patches in {args.root / args.split} with OD gains {args.gains}")


if __name__ == "__main__":
    main()
