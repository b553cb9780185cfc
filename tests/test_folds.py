import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from pcam_prep.pipeline.folds import assign_folds, stratified_folds, stratified_group_folds

labels_st = st.lists(st.integers(0, 1), min_size=1, max_size=400)


@given(labels=labels_st, k=st.integers(1, 7), seed=st.integers(0, 2**32 - 1))
def test_stratified_folds_balance_every_class(labels, k, seed):
    labels = np.array(labels)
    folds = stratified_folds(labels, k, seed)
    assert folds.min() >= 0 and folds.max() < k
    for cls in (0, 1):
        counts = np.bincount(folds[labels == cls], minlength=k)
        assert counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(folds, stratified_folds(labels, k, seed))


@settings(max_examples=60)
@given(labels=labels_st, k=st.integers(2, 6), n_groups=st.integers(1, 60), seed=st.integers(0, 1000))
def test_group_folds_never_split_a_group(labels, k, n_groups, seed):
    labels = np.array(labels)
    groups = np.array([f"g{i % n_groups}" for i in range(len(labels))])
    folds = stratified_group_folds(labels, groups, k, seed)
    frame = pd.DataFrame({"g": groups, "f": folds})
    assert (frame.groupby("g")["f"].nunique() == 1).all()
    np.testing.assert_array_equal(folds, stratified_group_folds(labels, groups, k, seed))


def test_group_folds_stay_roughly_stratified():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 300, 20000).astype(str)
    rate = rng.uniform(0.1, 0.7, 300)
    labels = (rng.random(20000) < rate[groups.astype(int)]).astype(int)
    folds = stratified_group_folds(labels, groups, 5, 0)
    share = [labels[folds == f].mean() for f in range(5)]
    sizes = np.bincount(folds)
    assert max(share) - min(share) < 0.03
    assert sizes.max() / sizes.min() < 1.1


def test_ids_without_a_group_become_their_own_group():
    train = pd.DataFrame({"id": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]})
    folds = assign_folds(train, 2, 0, pd.Series({"a": "s1", "b": "s1"}))
    assert folds[0] == folds[1]
