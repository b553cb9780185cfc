import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pcam_prep.moments import Moments, channel_moments, merge


@pytest.mark.parametrize("shape", [(1, 96, 96, 3), (65, 96, 96, 3), (3, 50, 50, 3), (0, 96, 96, 3)])
def test_moments_are_exact_integers(shape):
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    m = channel_moments(x)
    wide = x.reshape(-1, 3).astype(np.int64)
    assert m.sums == tuple(int(v) for v in wide.sum(axis=0))
    assert m.squares == tuple(int(v) for v in (wide**2).sum(axis=0))
    assert m.count == shape[0] * shape[1] * shape[2]


def test_extreme_values_stay_exact():
    x = np.full((70, 96, 96, 3), 255, np.uint8)
    m = channel_moments(x)
    assert m.squares == (70 * 96 * 96 * 255 * 255,) * 3
    assert m.std == [0.0, 0.0, 0.0] and m.mean == [1.0, 1.0, 1.0]


@given(arrays(np.uint8, st.tuples(st.integers(1, 12), st.just(8), st.just(8), st.just(3))), st.integers(1, 11))
def test_merging_parts_in_any_split_equals_the_whole(x, cut):
    cut = min(cut, len(x))
    whole = channel_moments(x)
    assert merge([channel_moments(x[:cut]), channel_moments(x[cut:])]) == whole
    assert (whole - channel_moments(x[:cut])) == channel_moments(x[cut:])
    ref = x.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(whole.mean, ref.mean(axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(whole.std, ref.std(axis=0), rtol=1e-7, atol=1e-9)


def test_empty_moments_are_nan_not_an_error():
    assert all(np.isnan(v) for v in Moments().mean)
