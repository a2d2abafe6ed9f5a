"""Guard rails on embeddings: health, calibrated thresholds, mass removal, sidecars that do not match the index.

Issue 13 parts 3-4 and issue 17 #7 / #11: every stage reads the embeddings
part by part and checks them against the index; a collapsed or meaningless
embedding cannot silently empty a dataset.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pyarrow as pa
import pytest

from helpers import load_helper
from webcurate.shards import manifest as manifest_mod
from webcurate.shards.dataset import Dataset

cd = load_helper(pathlib.Path(__file__).with_name("cluster_data.py"))


def test_embed_records_health_and_a_calibration_that_separates_the_planted_copies(search_pool):
    from webcurate.curation.dedup import run_dedup

    entry = Dataset(search_pool.root).manifest["stages"]["embeddings"]
    health, cal = entry["health"], entry["calibration"]
    assert {"mean_cosine", "effective_rank", "near_identical_share"} <= set(health)
    assert 0 < cal["copy_recall"] <= 1 and cal["false_pair_rate"] is not None and cal["samples"] == 38
    # Random-init features put unrelated test photos <= ~0.6 apart and planted copies >= 0.93: the
    # calibrated threshold lies between them, so `--threshold auto` finds the copies with no false pair.
    assert 0.55 < cal["threshold"] < 0.93, cal
    result = run_dedup(search_pool.root, summary=False)
    assert result.info["threshold_source"] == "calibrated" and result.info["threshold"] == cal["threshold"]
    rows = {r["key"]: r for r in Dataset(search_pool.root).read_sidecar("dedup").to_pylist()}
    copies = {k: r["duplicate_of"] for k, r in rows.items() if r["reason"] == "copy"}
    assert set(copies.items()) <= set(search_pool.near.items()) and len(copies) >= 0.9 * len(search_pool.near)


def test_health_flags_embeddings_that_do_not_separate_images():
    from webcurate.curation.embedding_health import health_of

    rng = np.random.default_rng(0)
    spread = rng.normal(size=(500, 64)).astype(np.float32)
    collapsed = (np.ones(64) + 0.05 * rng.normal(size=(500, 64))).astype(np.float32)
    for x in (spread, collapsed):
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    good, bad = health_of(spread), health_of(collapsed)
    assert "warning" not in good and good["mean_cosine"] < 0.1 and good["effective_rank"] > 30
    assert bad["mean_cosine"] > 0.9 and "do not separate images" in bad["warning"]


def test_copy_threshold_sits_between_copies_and_unrelated_neighbours():
    from webcurate.curation.embedding_health import choose_threshold

    rng = np.random.default_rng(1)
    copies = rng.uniform(0.85, 0.99, 400)
    # Pool neighbours: mostly unrelated (<= 0.6), plus a tenth that are the pool's own duplicates.
    neighbours = np.concatenate([rng.uniform(0.2, 0.6, 900), rng.uniform(0.9, 0.99, 100)])
    t = choose_threshold(copies, neighbours, rng.uniform(-0.2, 0.5, 5000))
    assert 0.6 < t < 0.85
    # Random pairs keep it above unrelated images even when the (few) neighbours say otherwise.
    assert 0.79 < choose_threshold(copies, neighbours, rng.uniform(0.5, 0.8, 5000)) < 0.85


def test_mass_removal_is_refused_before_anything_is_written_and_allowed_on_request(search_pool):
    from webcurate.curation.dedup import MassRemovalError, run_dedup

    with pytest.raises(MassRemovalError) as e:
        run_dedup(search_pool.root, threshold=-1.0, summary=False)
    msg = str(e.value)
    assert "would remove" in msg and "nothing was written" in msg and "components by size" in msg
    assert "embedding health: " in msg and "mean_cosine" in msg and "--allow-mass-removal" in msg
    assert Dataset(search_pool.root).sidecar_completed("dedup") == []
    result = run_dedup(search_pool.root, threshold=-1.0, allow_mass_removal=True, summary=False)
    assert result.totals["kept"] < 5 and result.info["largest_components"][0] > 30


def test_zero_and_constant_vectors_count_as_missing_embeddings(tmp_path):
    from webcurate.curation.dedup import run_dedup

    root = str(tmp_path / "ds")
    keys = cd.write_dataset(root, 30, shard_size=10)
    x, _ = cd.mixture(16, [30], spread=2.0, seed=1)
    x[10:20] = 0.0  # a whole shard of zero vectors (a broken backbone)
    x[25] = 0.25    # a constant vector
    cd.write_embeddings(root, keys, x)
    run_dedup(root, threshold=0.9, summary=False)
    rows = {r["key"]: r for r in Dataset(root).read_sidecar("dedup").to_pylist()}
    missing = {k for k, r in rows.items() if r["reason"] == "no_embedding"}
    assert missing == set(keys[10:20]) | {keys[25]}
    assert not any(r["reason"] == "copy" for r in rows.values()), "zero vectors must not merge into one group"


def test_embeddings_with_keys_the_index_does_not_know_are_left_out_and_reported(tmp_path):
    from webcurate.curation.cluster import run_cluster
    from webcurate.curation.export_selection import run_export
    from webcurate.curation.sample import run_sample

    root = str(tmp_path / "ds")
    keys = cd.write_dataset(root, 24, shard_size=12)
    x, _ = cd.mixture(8, [12, 12], seed=2)
    cd.write_embeddings(root, keys, x)
    ds = Dataset(root)
    part = ds.read_sidecar_part("embeddings", 0)
    ghost = pa.table({"key": ["ghost1", "ghost2"], "embedding": part["embedding"].slice(0, 2),
                      "status": ["ok", "ok"], "error": pa.array([None, None], pa.string())})
    ds.write_sidecar("embeddings", 0, pa.concat_tables([part, ghost]))
    res = run_cluster(root, levels="3", resampling_steps=0, summary=False)
    assert res.totals["embeddings_unknown_key"] == 2 and any("index does not list" in w for w in res.warnings)
    clustered = set(Dataset(root).read_sidecar("clusters")["key"].to_pylist())
    assert clustered == set(keys)
    run_sample(root, 24, summary=False)
    out = run_export(root, str(tmp_path / "out"), summary=False)
    assert out.info["exported"] == 24 and out.info["missing"] == 0


def test_a_garbage_embeddings_part_is_one_line_naming_the_file(tmp_path):
    root = str(tmp_path / "ds")
    keys = cd.write_dataset(root, 8, shard_size=4)
    cd.write_embeddings(root, keys, cd.mixture(8, [8], seed=3)[0])
    part = Dataset(root).sidecar_uri("embeddings", 1)
    with open(part, "wb") as f:
        f.write(b"PAR1 this is not parquet at all")
    p = subprocess.run([sys.executable, "-m", "webcurate.pipeline.cli", "dedup", "--input", root, "--threshold", "0.9",
                        "--no-report"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "WEBCURATE_QUIET": "1"})
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and part in lines[0] and "not a readable embeddings part" in lines[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_a_seed_set_embedded_at_another_image_size_warns(search_pool, tmp_path):
    from webcurate.curation.retrieve import run_retrieve

    seeds = str(tmp_path / "seeds")
    shutil.copytree(search_pool.root, seeds)
    m = manifest_mod.load(seeds)
    m["stages"]["embeddings"]["image_size"] = 32
    manifest_mod.save(seeds, m)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_retrieve(search_pool.root, [seeds], k=1, exclude_duplicates=False, summary=False)
    assert any("embedded at 32px" in str(w.message) and "64px" in str(w.message) for w in caught)


def test_calibration_warns_when_many_pool_images_have_a_neighbour_above_the_copy_threshold():
    from webcurate.curation.embedding_health import NEIGHBOUR_WARN_RATE, neighbour_warning

    assert neighbour_warning(0.95, NEIGHBOUR_WARN_RATE) == {}
    got = neighbour_warning(0.95, 0.067)["warning"]
    assert "6.7% of sampled pool images" in got and "0.950" in got
