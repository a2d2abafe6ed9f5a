"""Hierarchical k-means with resampling (real faiss) on synthetic mixtures."""
from __future__ import annotations

import pathlib
import warnings

import numpy as np
import pytest

from helpers import load_helper
from webcurate.curation import kmeans as km
from webcurate.curation.water_fill import balanced_sample, size_entropy


cd = load_helper(pathlib.Path(__file__).with_name("cluster_data.py"))

# 30 blobs whose sizes fall off like a power law: 4005 points down to 29.
SKEWED = [int(4000 / (i + 1) ** 1.5) + 5 for i in range(30)]


@pytest.fixture(scope="module")
def skewed():
    return cd.mixture(32, SKEWED, seed=1)


def test_balanced_sampling_over_hierarchy_evens_out_a_skewed_mixture(skewed):
    X, blob = skewed
    hier = km.hierarchical_kmeans(X, [90, 20, 5], resampling_steps=10, seed=0, progress=False)
    labels = hier.labels()
    target = 600
    balanced = balanced_sample(labels, target, distance=hier.distance, strategy="random", seed=0)
    rand = np.random.default_rng(0).choice(len(X), target, replace=False)
    h_bal, h_rand, h_max = size_entropy(blob[balanced]), size_entropy(blob[rand]), np.log(len(SKEWED))
    assert balanced.sum() == target
    # Random sampling follows the skew; balanced sampling gets close to uniform over the 30 blobs.
    assert h_bal > h_rand + 0.6, (h_bal, h_rand)
    assert h_bal > 0.85 * h_max, (h_bal, h_max)
    # The biggest blob (44% of the data) is cut to a small share.
    assert (blob[balanced] == 0).mean() < 0.15


def test_resampling_gives_a_dense_mode_fewer_clusters(skewed):
    X, blob = skewed
    plain = km.hierarchical_kmeans(X, [60], resampling_steps=0, seed=0, progress=False).labels()[:, 0]
    resampled = km.hierarchical_kmeans(X, [60], resampling_steps=10, seed=0, progress=False).labels()[:, 0]
    # k-means spends many centroids on the dense blob; resampling moves them to sparse blobs.
    assert len(np.unique(resampled[blob == 0])) < len(np.unique(plain[blob == 0]))
    assert len(np.unique(resampled[blob != 0])) > len(np.unique(plain[blob != 0]))


def test_levels_nest_and_upper_levels_cluster_centroids(skewed):
    X, _ = skewed
    hier = km.hierarchical_kmeans(X, [50, 10, 3], resampling_steps=2, seed=3, progress=False)
    labels = hier.labels()
    assert labels.shape == (len(X), 3) and labels.dtype == np.int32
    assert [lv.k for lv in hier.levels] == [50, 10, 3]
    for t in range(2):
        # Every level-t cluster lies inside exactly one level-(t+1) cluster: the parent of its centroid.
        parents = hier.parents(t + 1)
        assert parents.shape == (hier.levels[t].k,)
        np.testing.assert_array_equal(labels[:, t + 1], parents[labels[:, t]])
    # distance is the L2 distance to the point's level-1 centroid.
    c = hier.levels[0].centroids[labels[:, 0]]
    np.testing.assert_allclose(hier.distance, np.linalg.norm(X - c, axis=1), rtol=1e-4, atol=1e-4)


def test_same_seed_gives_identical_clusters_other_seed_differs(skewed):
    X, _ = skewed
    a = km.hierarchical_kmeans(X, [40, 8], resampling_steps=3, seed=7, progress=False)
    b = km.hierarchical_kmeans(X, [40, 8], resampling_steps=3, seed=7, progress=False)
    c = km.hierarchical_kmeans(X, [40, 8], resampling_steps=3, seed=8, progress=False)
    np.testing.assert_array_equal(a.labels(), b.labels())
    np.testing.assert_array_equal(a.levels[0].centroids, b.levels[0].centroids)
    assert not np.array_equal(a.levels[0].centroids, c.levels[0].centroids)


def test_k_larger_than_n_is_clamped_with_a_warning():
    X, _ = cd.mixture(8, [5, 4], seed=2)
    with pytest.warns(UserWarning, match="larger than the 9 inputs"):
        hier = km.hierarchical_kmeans(X, [50, 20], resampling_steps=2, seed=0, progress=False)
    assert [lv.k for lv in hier.levels] == [9, 9]
    assert [lv.requested_k for lv in hier.levels] == [50, 20]
    assert len(hier.warnings) == 2
    assert len(np.unique(hier.labels()[:, 0])) == 9  # one point per cluster


def test_nan_embeddings_are_refused_with_the_row_count():
    X = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    X[[3, 7]] = np.nan
    with pytest.raises(km.KMeansError, match="2 row"):
        km.hierarchical_kmeans(X, [4], progress=False)


def test_bad_levels_and_step_lists_are_refused():
    X = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    with pytest.raises(km.KMeansError, match="at least one"):
        km.hierarchical_kmeans(X, [], progress=False)
    with pytest.raises(km.KMeansError, match="resampling_steps has 1 entries for 2 levels"):
        km.hierarchical_kmeans(X, [4, 2], resampling_steps=[3], progress=False)
    with pytest.raises(km.KMeansError, match=">= 1"):
        km.hierarchical_kmeans(X, [0], progress=False)


def test_split_kmeans_is_close_to_flat_kmeans_objective():
    X, _ = cd.mixture(32, [400] * 25, spread=0.5, seed=4)
    flat = km.kmeans(X, 200, niter=20, seed=0)
    split = km.split_kmeans(X, 200, niter=20, seed=0, refine_iters=2)
    assert split.k == 200
    assert np.bincount(split.assignment, minlength=200).sum() == len(X)
    obj_flat = float((flat.distance ** 2).mean())
    obj_split = float((split.distance ** 2).mean())
    assert obj_split < 1.05 * obj_flat, (obj_split, obj_flat)


def test_ivf_assignment_finds_the_nearest_centroid_for_nearly_all_points():
    X, _ = cd.mixture(32, [300] * 40, spread=0.5, seed=5)
    C = km.kmeans(X, 1100, niter=5, seed=0).centroids
    exact, d_exact = km.assign(X, C, approximate=False)
    approx, d_approx = km.assign(X, C, approximate=True, nprobe=8)
    assert (exact == approx).mean() > 0.95
    # When it misses, it still returns a true distance to the centroid it chose.
    np.testing.assert_allclose(d_approx, np.linalg.norm(X - C[approx], axis=1), rtol=1e-3, atol=1e-3)
    assert (d_approx >= d_exact - 1e-3).all()


def test_proportional_split_sums_to_k_within_bounds():
    sizes = np.array([1000, 10, 1, 1, 500, 3])
    for k in (6, 7, 50, 200, 1515):
        out = km._proportional_split(sizes, k)
        assert out.sum() == k
        assert (out >= 1).all() and (out <= sizes).all()
    out = km._proportional_split(sizes, 151)
    assert out[0] > out[4] > out[1]


def test_flat_and_split_levels_are_chosen_by_problem_size(monkeypatch):
    X, _ = cd.mixture(16, [200] * 10, seed=6)
    monkeypatch.setattr(km, "SPLIT_WORK", 1e4)  # force "large" for this small problem
    monkeypatch.setattr(km, "LEVEL1_RESAMPLE_WORK", 1e4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hier = km.hierarchical_kmeans(X, [1024, 10], resampling_steps=2, seed=0, progress=False)
    assert hier.levels[0].method == "split" and hier.levels[0].resampling_steps == 0
    assert hier.levels[1].method == "flat" and hier.levels[1].resampling_steps == 2
