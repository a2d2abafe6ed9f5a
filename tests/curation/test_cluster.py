"""`webcurate cluster` as a stage: sidecar, centroids, resume, subsets, bad input."""
from __future__ import annotations

import io
import os
import pathlib

import numpy as np
import pytest

from helpers import load_helper
from webcurate.shards import manifest as manifest_mod
from webcurate.shards.dataset import Dataset, DatasetError


cd = load_helper(pathlib.Path(__file__).with_name("cluster_data.py"))
N, SHARD = 150, 50


@pytest.fixture(scope="module")
def base_dataset(tmp_path_factory):
    """150 real JPEG samples in 3 shards, with 16-d embeddings from 6 blobs of skewed sizes."""
    root = str(tmp_path_factory.mktemp("cluster") / "ds")
    keys = cd.write_dataset(root, N, shard_size=SHARD)
    X, blob = cd.mixture(16, [60, 40, 20, 15, 10, 5], seed=3)
    cd.write_embeddings(root, keys, X)
    return root, keys, X, blob


@pytest.fixture
def dataset(base_dataset, tmp_path):
    """A fresh copy of the base dataset per test (stages write into it)."""
    import shutil

    root, keys, X, blob = base_dataset
    dst = str(tmp_path / "ds")
    shutil.copytree(root, dst)
    return dst, keys, X, blob


def test_cluster_writes_levels_distance_and_centroids_per_shard(dataset):
    from webcurate.curation.cluster import load_centroids, run_cluster

    root, keys, X, _ = dataset
    res = run_cluster(root, levels="12,3", resampling_steps=2, seed=0, summary=False)
    assert res.ran and [lv["k"] for lv in res.info["levels"]] == [12, 3]
    ds = Dataset(root)
    assert ds.sidecar_completed("clusters") == [0, 1, 2]
    t = ds.read_sidecar("clusters")
    assert t.column_names == ["key", "status", "level_1", "level_2", "distance"]
    assert str(t.schema.field("level_1").type) == "int32"
    assert sorted(t["key"].to_pylist()) == sorted(keys)
    assert set(t["status"].to_pylist()) == {"ok"}
    # Each shard's part holds that shard's keys.
    for s in range(3):
        part = ds.read_sidecar_part("clusters", s)
        assert sorted(part["key"].to_pylist()) == keys[s * SHARD:(s + 1) * SHARD]
    c1 = load_centroids(root, 1)
    assert c1.shape == (12, 16) and c1.dtype == np.float32
    from webcurate.shards import storage

    parents = np.load(io.BytesIO(storage.read_bytes(f"{root}/clusters/parents_level_1.npy")))
    l1, l2 = t["level_1"].to_numpy(), t["level_2"].to_numpy()
    np.testing.assert_array_equal(l2, parents[l1])
    # distance = L2 distance to the level-1 centroid of the sample's embedding.
    row = {k: i for i, k in enumerate(keys)}
    xi = X[[row[k] for k in t["key"].to_pylist()]]
    np.testing.assert_allclose(t["distance"].to_numpy(), np.linalg.norm(xi - c1[l1], axis=1), atol=1e-4)
    entry = ds.manifest["stages"]["clusters"]
    assert entry["counts"]["clustered"] == N and entry["finished"]


def test_rerun_skips_and_new_parameters_recompute(dataset):
    from webcurate.curation.cluster import run_cluster

    root, *_ = dataset
    run_cluster(root, levels="8,2", resampling_steps=1, seed=0, summary=False)
    assert not run_cluster(root, levels="8,2", resampling_steps=1, seed=0, summary=False).ran
    again = run_cluster(root, levels="8,2", resampling_steps=1, seed=1, summary=False)
    assert again.ran
    assert Dataset(root).manifest["stages"]["clusters"]["parameters"]["seed"] == 1


def test_a_lost_part_is_rewritten_byte_identical(dataset):
    from webcurate.curation.cluster import run_cluster
    from webcurate.shards import storage

    root, *_ = dataset
    run_cluster(root, levels="10,3", resampling_steps=2, seed=4, summary=False)
    uri = Dataset(root).sidecar_uri("clusters", 1)
    before = storage.read_bytes(uri)
    storage.delete(uri)  # as if the run had been killed before writing this part
    res = run_cluster(root, levels="10,3", resampling_steps=2, seed=4, summary=False)
    assert sorted(res.done) == [1]
    assert storage.read_bytes(uri) == before


def test_dedup_survivors_only_are_clustered(dataset):
    from webcurate.curation.cluster import run_cluster

    root, keys, *_ = dataset
    dropped = set(keys[::5])
    cd.write_flag_sidecar(root, "dedup", "keep", {k: k not in dropped for k in keys})
    res = run_cluster(root, levels="10,2", resampling_steps=1, seed=0, summary=False)
    assert res.totals["clustered"] == N - len(dropped) and res.totals["duplicate"] == len(dropped)
    t = Dataset(root).read_sidecar("clusters").to_pylist()
    for r in t:
        if r["key"] in dropped:
            assert r["status"] == "duplicate" and r["level_1"] == -1 and np.isnan(r["distance"])
        else:
            assert r["status"] == "ok" and r["level_1"] >= 0
    # --subset all ignores dedup.
    res = run_cluster(root, levels="10,2", resampling_steps=1, seed=0, subset="all", summary=False)
    assert res.totals["clustered"] == N


def test_k_larger_than_the_samples_is_clamped_with_a_warning(dataset, capsys):
    from webcurate.curation.cluster import run_cluster

    root, *_ = dataset
    res = run_cluster(root, levels="500,400", resampling_steps=0, seed=0, summary=False)
    assert [lv["k"] for lv in res.info["levels"]] == [N, N]
    assert any("larger than the 150" in w for w in res.warnings)
    assert "warning: level 1 k=500" in capsys.readouterr().out


def test_missing_or_partial_embeddings_are_clear_errors(tmp_path):
    from webcurate.curation.cluster import run_cluster

    root = str(tmp_path / "ds")
    keys = cd.write_dataset(root, 20, shard_size=10)
    with pytest.raises(DatasetError, match="webcurate embed"):
        run_cluster(root, levels="4", summary=False)
    X, _ = cd.mixture(8, [20], seed=0)
    cd.write_embeddings(root, keys, X)
    run = manifest_mod.stage_record(root, "embeddings")["run"]
    os.unlink(os.path.join(manifest_mod.progress_dir(root, "embeddings", run), "00001.json"))  # not embedded yet
    with pytest.raises(DatasetError, match="1 of 2"):
        run_cluster(root, levels="4", summary=False)


def test_nan_embeddings_are_refused_naming_keys(tmp_path):
    from webcurate.curation.cluster import run_cluster

    root = str(tmp_path / "ds")
    keys = cd.write_dataset(root, 12, shard_size=12)
    X, _ = cd.mixture(8, [12], seed=0)
    X[4] = np.nan
    cd.write_embeddings(root, keys, X)
    with pytest.raises(DatasetError, match=keys[4]):
        run_cluster(root, levels="3", summary=False)


def test_bad_levels_option_is_a_config_error(dataset):
    from webcurate.curation.cluster import run_cluster
    from webcurate.shards.errors import ConfigError

    root, *_ = dataset
    with pytest.raises(ConfigError, match="comma-separated"):
        run_cluster(root, levels="10,abc", summary=False)
    with pytest.raises(ConfigError, match="positive"):
        run_cluster(root, levels="10,0", summary=False)


def test_cli_cluster_sample_report_run_and_print_summaries(dataset):
    from click.testing import CliRunner

    from webcurate.pipeline.cli import main

    root, *_ = dataset
    runner = CliRunner()
    r = runner.invoke(main, ["cluster", "--input", root, "--levels", "9,3", "--resampling-steps", "0,2"])
    assert r.exit_code == 0, r.output
    assert "k asked -> used" in r.output and "clustered" in r.output
    r = runner.invoke(main, ["sample", "--input", root, "--target", "20", "--strategy", "closest"])
    assert r.exit_code == 0, r.output
    assert "selected" in r.output
    r = runner.invoke(main, ["report", root])
    assert r.exit_code == 0 and f"report: {root}/report.html" in r.output
    assert Dataset(root).manifest["stages"]["clusters"]["parameters"]["resampling_steps"] == [0, 2]


def test_cli_user_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    root = str(tmp_path / "ds")
    cd.write_dataset(root, 4, shard_size=4)
    p = subprocess.run([sys.executable, "-m", "webcurate.pipeline.cli", "cluster", "--input", root],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"error: {root} has no `embeddings` table yet; "
                                             f"run `webcurate embed --input {root}` first"]
