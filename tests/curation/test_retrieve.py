"""`webcurate retrieve`: sample- and cluster-based retrieval from seed datasets."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

from webcurate.shards.dataset import Dataset

SEEDED = {"s002": "po002", "s004": "po004", "s006": "po006", "s008": "po008"}


def _selected(root: str) -> dict[str, dict]:
    return {r["key"]: r for r in Dataset(root).read_sidecar("retrieve").to_pylist() if r["selected"]}


def test_sample_retrieval_finds_the_pool_photos_behind_the_seeds(search_pool, search_seed):
    from webcurate.curation.retrieve import run_retrieve

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no dedup table yet: warned, pool = everything
        result = run_retrieve(search_pool.root, [search_seed], k=1, min_score=0.8, summary=False)
    sel = _selected(search_pool.root)
    # k=1: each seed copy retrieves exactly one photo, and unrelated seeds fall under min_score.
    hits = {r["seed_key"]: k for k, r in sel.items()}
    assert len(sel) == 4 and set(hits) == set(SEEDED)
    for seed_key, key in hits.items():  # the original or its planted copy
        assert key == SEEDED[seed_key] or search_pool.near.get(key) == SEEDED[seed_key]
    assert all(r["score"] > 0.8 and r["seed_dataset"] == search_seed and r["mode"] == "sample" for r in sel.values())
    table = Dataset(search_pool.root).read_sidecar("retrieve")
    assert table.num_rows == 38 and table.column_names == ["key", "selected", "score", "seed_key",
                                                           "seed_dataset", "mode"]
    assert result.totals["selected"] == 4 and result.message is None


def test_duplicates_dropped_by_dedup_are_not_retrieved(search_pool, search_seed):
    from webcurate.curation.dedup import run_dedup
    from webcurate.curation.retrieve import run_retrieve

    run_dedup(search_pool.root, threshold=0.75, summary=False)
    result = run_retrieve(search_pool.root, [search_seed], k=2, min_score=0.8, summary=False)
    sel = _selected(search_pool.root)
    # With the copies gone, each seed's 2 nearest are its original and an unrelated photo under 0.8.
    assert set(sel) == set(SEEDED.values())
    assert result.info["pool_searched"] == 38 - 14  # 12 copies + 2 exact left out (the broken file has no embedding)


def test_cluster_mode_without_enough_seeds_per_cluster_reports_instead_of_failing(search_pool, search_seed):
    from webcurate.curation.retrieve import run_retrieve

    with pytest.warns(UserWarning, match="no pool cluster holds more than 50 seed samples"):
        result = run_retrieve(search_pool.root, [search_seed], mode="cluster", min_seed_per_cluster=50,
                              exclude_duplicates=False, summary=False)
    assert result.totals["selected"] == 0 and "--mode sample" in result.message
    assert Dataset(search_pool.root).sidecar_completed("retrieve") == [0, 1, 2]


def test_both_modes_union_their_selections(search_pool, search_seed):
    from webcurate.curation.retrieve import run_retrieve

    result = run_retrieve(search_pool.root, [search_seed], k=1, mode="both", n_clusters=4, per_cluster=3,
                          min_seed_per_cluster=1, exclude_duplicates=False, summary=False)
    sel = _selected(search_pool.root)
    modes = {r["mode"] for r in sel.values()}
    assert modes <= {"sample", "cluster", "both"} and "both" in modes
    assert 4 <= result.info["selected_sample"] <= 7  # k=1 per seed, 7 seeds
    assert len(sel) == result.totals["selected"] <= 7 + 3 * 4


def test_cluster_retrieval_takes_only_clusters_with_more_than_min_seeds(tmp_path):
    import pathlib

    from helpers import load_helper
    from webcurate.curation.retrieve import run_retrieve

    cd = load_helper(pathlib.Path(__file__).with_name("cluster_data.py"))
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 32)).astype(np.float32) * 4
    pool = np.concatenate([c + rng.normal(size=(50, 32)).astype(np.float32) for c in centers])
    seeds = np.concatenate([centers[0] + rng.normal(size=(5, 32)), centers[1] + rng.normal(size=(2, 32))]).astype(np.float32)
    for a in (pool, seeds):
        a /= np.linalg.norm(a, axis=1, keepdims=True)
    root, seed_root = str(tmp_path / "pool"), str(tmp_path / "seeds")
    keys = cd.write_dataset(root, 200, shard_size=70)
    cd.write_embeddings(root, keys, pool)
    seed_keys = cd.write_dataset(seed_root, 7, shard_size=7, prefix="s")
    cd.write_embeddings(seed_root, seed_keys, seeds)
    result = run_retrieve(root, [seed_root], mode="cluster", n_clusters=4, per_cluster=20, min_seed_per_cluster=3,
                          exclude_duplicates=False, summary=False)
    assert (result.info["clusters"], result.info["clusters_selected"]) == (4, 1)
    sel = _selected(root)
    chosen = sorted(keys.index(k) for k in sel)
    assert len(chosen) == 20 and max(chosen) < 50  # only from blob 0, which holds 5 > 3 seeds
    assert {r["seed_key"] for r in sel.values()} <= set(seed_keys[:5])
    # The 20 taken are the blob members closest to a seed.
    best = (pool[:50] @ seeds[:5].T).max(axis=1)
    assert set(chosen) == set(np.argsort(-best)[:20].tolist())


def test_seed_from_another_model_is_refused(search_pool, tmp_path):
    from webcurate.curation.retrieve import run_retrieve
    from webcurate.curation.embedding_parts import EmbeddingError
    from webcurate.shards import manifest as manifest_mod

    other = str(tmp_path / "other")
    shutil.copytree(search_pool.root, other)
    m = manifest_mod.load(other)
    m["stages"]["embeddings"]["model"] = "vit_small_patch14_dinov2"
    manifest_mod.save(other, m)
    with pytest.raises(EmbeddingError, match="different models.*convnext_atto.*vit_small_patch14_dinov2"):
        run_retrieve(search_pool.root, [other], summary=False)


def test_seed_without_embeddings_is_a_clear_error(search_pool, tmp_path, search_data):
    from webcurate.curation.retrieve import run_retrieve
    from webcurate.curation.embedding_parts import EmbeddingError

    raw = str(tmp_path / "raw")
    search_data.write_dataset(raw, [search_data.Item("a", search_data.jpeg_bytes(search_data.make_photo(1)))], 4)
    with pytest.raises(EmbeddingError, match="seed dataset .* has no embeddings"):
        run_retrieve(search_pool.root, [raw], summary=False)


def test_k_larger_than_the_pool_is_clamped_with_a_warning(search_pool, search_seed):
    from webcurate.curation.retrieve import run_retrieve

    with pytest.warns(UserWarning, match="k=500 is larger than the 38 vectors"):
        result = run_retrieve(search_pool.root, [search_seed], k=500, exclude_duplicates=False, summary=False)
    assert result.totals["selected"] == 38


def test_cli_retrieve_prints_a_summary_and_the_zero_match_note(search_pool, search_seed):
    from click.testing import CliRunner

    from webcurate.curation.cli import retrieve

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = CliRunner().invoke(retrieve, ["--input", search_pool.root, "--seeds", search_seed, "--mode", "cluster",
                                            "--min-seed-per-cluster", "99", "--no-report"])
    assert out.exit_code == 0, out.output
    assert "retrieve (cluster)" in out.output and "note: no pool cluster" in out.output
