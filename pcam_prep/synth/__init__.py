"""Synthetic H&E-like patches in the exact Kaggle (tif folders) and PCam (HDF5 files) layouts.

The generator follows the PCam label rule (tumour in the centre window) and gives ids that
are the sha1 of the pixels, so every part of the tool can be tested on data it makes itself.
"""

from .kaggle import SynthSummary, make_patch, write_kaggle
from .pair import PairSummary, write_pair
from .pcam import write_pcam_h5

__all__ = ["PairSummary", "SynthSummary", "make_patch", "write_kaggle", "write_pair", "write_pcam_h5"]
