"""Balanced sampling: water-filling over a cluster hierarchy."""
from __future__ import annotations

import numpy as np
import pytest

from webcurate.curation.water_fill import SamplingError, balanced_sample, size_entropy, water_fill


def _brute_force_cap(sizes: np.ndarray, target: int) -> int:
    cap = 0
    while np.minimum(cap + 1, sizes).sum() <= target and cap < sizes.max():
        cap += 1
    return cap


def test_water_fill_hits_each_parent_target_exactly_and_caps_large_children():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n_children = int(rng.integers(1, 15))
        sizes = rng.integers(1, 60, size=n_children)
        parent = np.sort(rng.integers(0, 3, size=n_children))
        P = 3
        totals = np.bincount(parent, weights=sizes, minlength=P).astype(int)
        targets = np.array([rng.integers(0, t + 1) if t else 0 for t in totals])
        share = water_fill(sizes, parent, targets, np.random.default_rng(trial))
        assert (share <= sizes).all() and (share >= 0).all()
        np.testing.assert_array_equal(np.bincount(parent, weights=share, minlength=P).astype(int), targets)
        for p in range(P):
            kids = parent == p
            if not kids.any():
                continue
            cap = _brute_force_cap(sizes[kids], int(targets[p]))
            # Small children are taken whole; the others get the cap or cap + 1.
            assert (share[kids][sizes[kids] <= cap] == sizes[kids][sizes[kids] <= cap]).all()
            big = sizes[kids] > cap
            assert np.isin(share[kids][big], [cap, cap + 1]).all()


def test_water_fill_refuses_a_target_larger_than_the_cluster():
    with pytest.raises(SamplingError, match="holds 5"):
        water_fill(np.array([2, 3]), np.array([0, 0]), np.array([6]), np.random.default_rng(0))


def _two_level_labels():
    # 3 top clusters: [0] holds leaves 0,1 (sizes 500, 300); [1] holds leaf 2 (10); [2] holds leaves 3,4 (40, 5).
    sizes = [500, 300, 10, 40, 5]
    top = [0, 0, 1, 2, 2]
    leaf = np.repeat(np.arange(5), sizes)
    labels = np.stack([leaf, np.asarray(top)[leaf]], axis=1)
    return labels, np.asarray(sizes)


@pytest.mark.parametrize("target", [0, 1, 3, 50, 100, 200, 854, 855, 10_000])
def test_balanced_sample_selects_exactly_the_target(target):
    labels, sizes = _two_level_labels()
    n = int(sizes.sum())
    mask = balanced_sample(labels, target, strategy="random", seed=1)
    assert mask.dtype == bool and mask.shape == (n,)
    assert mask.sum() == min(target, n)


def test_balanced_sample_water_fills_top_down():
    labels, _ = _two_level_labels()
    mask = balanced_sample(labels, 100, strategy="random", seed=0)
    per_top = np.bincount(labels[mask, 1], minlength=3)
    per_leaf = np.bincount(labels[mask, 0], minlength=5)
    # Top: cap 45 -> clusters of 10 kept whole, the other two split the rest 45 / 45.
    np.testing.assert_array_equal(per_top, [45, 10, 45])
    # Inside top cluster 2 (leaves of 40 and 5): the 5 are kept whole, 40 gives the rest.
    assert per_leaf[4] == 5 and per_leaf[3] == 40
    # Inside top cluster 0 (500 and 300): split evenly.
    assert sorted(per_leaf[:2].tolist()) == [22, 23]


def test_closest_strategy_takes_the_points_nearest_each_centroid():
    labels, _ = _two_level_labels()
    rng = np.random.default_rng(3)
    dist = rng.random(len(labels)).astype(np.float32)
    mask = balanced_sample(labels, 100, distance=dist, strategy="closest", seed=0)
    for leaf in range(5):
        inside = labels[:, 0] == leaf
        chosen, rest = dist[inside & mask], dist[inside & ~mask]
        if len(chosen) and len(rest):
            assert chosen.max() <= rest.min()


def test_sampling_is_deterministic_given_seed():
    labels, _ = _two_level_labels()
    a = balanced_sample(labels, 123, strategy="random", seed=5)
    b = balanced_sample(labels, 123, strategy="random", seed=5)
    c = balanced_sample(labels, 123, strategy="random", seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_balanced_beats_random_on_cluster_size_entropy():
    labels, _ = _two_level_labels()
    mask = balanced_sample(labels, 100, strategy="random", seed=0)
    rand = np.random.default_rng(0).choice(len(labels), 100, replace=False)
    assert size_entropy(labels[mask, 0]) > size_entropy(labels[rand, 0]) + 0.5


def test_labels_that_do_not_nest_are_refused():
    labels = np.array([[0, 0], [0, 1], [1, 1]])
    with pytest.raises(SamplingError, match="do not nest"):
        balanced_sample(labels, 2)


def test_bad_strategy_and_missing_distance_are_refused():
    labels, _ = _two_level_labels()
    with pytest.raises(SamplingError, match="unknown strategy"):
        balanced_sample(labels, 5, strategy="farthest")
    with pytest.raises(SamplingError, match="distance"):
        balanced_sample(labels, 5, strategy="closest")
    with pytest.raises(SamplingError, match=">= 0"):
        balanced_sample(labels, -1)


def test_sampling_a_million_points_takes_well_under_a_second():
    import time

    rng = np.random.default_rng(0)
    leaf = rng.zipf(1.5, size=1_000_000) % 10_000
    labels = np.stack([leaf, leaf // 10, leaf // 100], axis=1)
    t0 = time.perf_counter()
    mask = balanced_sample(labels, 100_000, distance=rng.random(1_000_000), strategy="closest", seed=0)
    assert mask.sum() == 100_000
    assert time.perf_counter() - t0 < 5.0  # generous for a shared 2-core machine; ~0.5 s alone
