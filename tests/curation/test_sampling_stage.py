"""`webcurate sample` as a stage: exact target, only clustered keys, resume, warnings."""
from __future__ import annotations

import pathlib
import shutil

import numpy as np
import pytest

from helpers import load_helper
from webcurate.shards.dataset import Dataset, DatasetError


cd = load_helper(pathlib.Path(__file__).with_name("cluster_data.py"))
N = 120


@pytest.fixture(scope="module")
def clustered_base(tmp_path_factory):
    """120 samples in 3 shards, 20 of them dedup-dropped, clustered on 12,3."""
    from webcurate.curation.cluster import run_cluster

    root = str(tmp_path_factory.mktemp("sample") / "ds")
    keys = cd.write_dataset(root, N, shard_size=40)
    X, blob = cd.mixture(16, [70, 25, 15, 10], seed=5)
    cd.write_embeddings(root, keys, X)
    dropped = set(keys[3::6])
    cd.write_flag_sidecar(root, "dedup", "keep", {k: k not in dropped for k in keys})
    run_cluster(root, levels="12,3", resampling_steps=3, seed=0, summary=False)
    return root, keys, dropped, dict(zip(keys, blob))


@pytest.fixture
def clustered(clustered_base, tmp_path):
    root, *rest = clustered_base
    dst = str(tmp_path / "ds")
    shutil.copytree(root, dst)
    return (dst, *rest)


def test_sample_selects_exactly_the_target_among_clustered_keys(clustered):
    from webcurate.curation.sample import run_sample

    root, keys, dropped, _ = clustered
    res = run_sample(root, 37, strategy="closest", seed=0, summary=False)
    assert res.info["selected"] == 37 and res.info["clustered"] == N - len(dropped)
    ds = Dataset(root)
    assert ds.sidecar_completed("sample") == [0, 1, 2]
    t = ds.read_sidecar("sample")
    assert t.column_names == ["key", "selected"]
    assert sorted(t["key"].to_pylist()) == sorted(keys)
    chosen = {k for k, s in zip(t["key"].to_pylist(), t["selected"].to_pylist()) if s}
    assert len(chosen) == 37 and not (chosen & dropped)
    # Balancing raised the cluster-size entropy of the selection.
    assert res.info["entropy_after"] > res.info["entropy_before"]


def test_balanced_sample_spreads_over_blobs_more_than_their_sizes(clustered):
    from webcurate.curation.sample import run_sample
    from webcurate.curation.water_fill import size_entropy

    root, keys, dropped, blob_of = clustered
    run_sample(root, 40, strategy="random", seed=1, summary=False)
    t = Dataset(root).read_sidecar("sample")
    chosen = [k for k, s in zip(t["key"].to_pylist(), t["selected"].to_pylist()) if s]
    pool = [k for k in keys if k not in dropped]
    rand = list(np.random.default_rng(0).choice(pool, 40, replace=False))
    assert size_entropy(np.array([blob_of[k] for k in chosen])) > size_entropy(np.array([blob_of[k] for k in rand]))


def test_rerun_skips_and_new_target_recomputes(clustered):
    from webcurate.curation.sample import run_sample

    root, *_ = clustered
    run_sample(root, 30, summary=False)
    assert not run_sample(root, 30, summary=False).ran
    res = run_sample(root, 31, summary=False)
    assert res.ran and res.info["selected"] == 31


def test_target_above_the_clustered_count_selects_all_with_a_warning(clustered):
    from webcurate.curation.sample import run_sample

    root, keys, dropped, _ = clustered
    with pytest.warns(UserWarning, match="larger than the 100 clustered"):
        res = run_sample(root, 10_000, summary=False)
    assert res.info["selected"] == N - len(dropped)


def test_sample_without_clusters_is_a_clear_error(tmp_path):
    from webcurate.curation.sample import run_sample

    root = str(tmp_path / "ds")
    cd.write_dataset(root, 6, shard_size=6)
    with pytest.raises(DatasetError, match="webcurate cluster"):
        run_sample(root, 3, summary=False)


def test_reclustering_invalidates_the_sample(clustered):
    from webcurate.curation.cluster import run_cluster
    from webcurate.curation.sample import run_sample

    root, *_ = clustered
    run_sample(root, 30, summary=False)
    run_cluster(root, levels="6,2", resampling_steps=1, seed=9, summary=False)
    assert run_sample(root, 30, summary=False).ran
