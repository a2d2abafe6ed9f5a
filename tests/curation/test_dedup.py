"""`webcurate dedup`: exact, copy (kNN + union-find), SemDeDup and --against, on
planted near-duplicates embedded by a real model, plus the array-level algorithms."""
from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pytest

from webcurate.shards.dataset import Dataset

# Random-init features put unrelated test photos up to ~0.57 apart and planted
# copies >= 0.93: 0.75 sits in the gap (a trained copy-detection model uses 0.6).
THRESHOLD = 0.75


def _decisions(root: str) -> dict[str, dict]:
    return {r["key"]: r for r in Dataset(root).read_sidecar("dedup").to_pylist()}


def _precision_recall(removed: dict[str, str], planted: dict[str, str]) -> tuple[float, float]:
    """Pairs (copy -> original) found vs planted."""
    found = {(k, v) for k, v in removed.items()}
    truth = set(planted.items())
    tp = len(found & truth)
    return tp / max(len(found), 1), tp / max(len(truth), 1)


def test_copy_dedup_finds_planted_near_duplicates_and_keeps_the_originals(search_pool):
    from webcurate.curation.dedup import run_dedup

    result = run_dedup(search_pool.root, method="copy", threshold=THRESHOLD, summary=False)
    rows = _decisions(search_pool.root)
    assert set(rows) == set(search_pool.keys)
    copies = {k: r["duplicate_of"] for k, r in rows.items() if r["reason"] == "copy"}
    precision, recall = _precision_recall(copies, search_pool.near)
    assert precision == 1.0 and recall >= 0.9, (precision, recall, copies)
    # Policy "largest": the full-size q90 original beats its crop / half-size / q40 copy.
    assert all(rows[o]["keep"] for o in search_pool.originals)
    assert all(0.9 < rows[k]["similarity"] <= 1.0 for k in copies)
    # The cheap exact pass runs first; the broken image has no embedding and is not kept.
    assert {k: r["duplicate_of"] for k, r in rows.items() if r["reason"] == "exact"} == search_pool.exact
    assert rows[search_pool.broken[0]]["reason"] == "no_embedding" and not rows[search_pool.broken[0]]["keep"]
    assert result["counts"]["kept"] == len(search_pool.originals)
    assert result["index"] == "flat"
    entry = Dataset(search_pool.root).manifest["stages"]["dedup"]
    assert entry["completed_shards"] == [0, 1, 2] and entry["parameters"]["threshold"] == THRESHOLD


def test_exact_dedup_groups_identical_bytes_only(search_pool):
    from webcurate.curation.dedup import run_dedup

    result = run_dedup(search_pool.root, method="exact", summary=False)
    rows = _decisions(search_pool.root)
    removed = {k: r["duplicate_of"] for k, r in rows.items() if not r["keep"]}
    assert removed == search_pool.exact
    assert all(rows[k]["reason"] == "exact" and rows[k]["similarity"] == 1.0 for k in removed)
    assert result["counts"] == {"total": 39, "kept": 37, "removed": 2, "removed:exact": 2}


def test_semdedup_drops_copies_within_clusters(search_pool):
    from webcurate.curation.dedup import run_dedup

    run_dedup(search_pool.root, method="semdedup", eps=0.1, n_clusters=3, summary=False)
    rows = _decisions(search_pool.root)
    dropped = {k: r["duplicate_of"] for k, r in rows.items() if r["reason"] == "semdedup"}
    precision, recall = _precision_recall(dropped, search_pool.near)
    # Copies split from their original by k-means are out of SemDeDup's reach by design.
    assert precision == 1.0 and recall >= 0.75, (precision, recall, dropped)
    assert all(rows[o]["keep"] for o in search_pool.originals)
    assert all(r["similarity"] >= 0.9 for r in rows.values() if r["reason"] == "semdedup")


def test_against_drops_the_whole_component_of_a_match(search_pool, search_seed):
    from webcurate.curation.dedup import run_dedup

    result = run_dedup(search_pool.root, method="copy", threshold=THRESHOLD, against=[search_seed],
                       against_threshold=0.8, summary=False)
    rows = _decisions(search_pool.root)
    against = {k for k, r in rows.items() if r["reason"] == "against"}
    # Seeds re-encode photos 2, 4, 6, 8; each has a planted copy in the pool, dropped with it.
    expected = {f"po00{i}" for i in (2, 4, 6, 8)} | {k for k, o in search_pool.near.items()
                                                     if o in {f"po00{i}" for i in (2, 4, 6, 8)}}
    assert against == expected
    assert rows["po004"]["duplicate_of"] == "s004" and rows["po004"]["against_dataset"] == search_seed
    assert rows["po004"]["similarity"] > 0.8
    # The copy is dropped for its component, naming what the component matched.
    assert rows["pn004r"]["duplicate_of"] == "s004"
    assert result["against_hits"] >= 4 and result["counts"]["removed:against"] == len(expected)


def test_against_with_no_self_dedup_only_removes_matches(search_pool, search_seed):
    from webcurate.curation.dedup import run_dedup

    run_dedup(search_pool.root, method="none", threshold=THRESHOLD, against=[search_seed],
              against_threshold=0.8, summary=False)
    rows = _decisions(search_pool.root)
    removed = {k for k, r in rows.items() if not r["keep"]}
    assert {"po002", "po004", "po006", "po008"} <= removed
    assert all(rows[k]["reason"] == "against" for k in removed)
    assert rows["po001"]["keep"] and rows["px000"]["keep"]  # exact copies untouched by method none


def test_rerun_with_same_parameters_is_a_no_op_and_rewrites_a_lost_part(search_pool):
    from webcurate.curation.dedup import run_dedup

    run_dedup(search_pool.root, threshold=THRESHOLD, summary=False)
    ds = Dataset(search_pool.root)
    part1 = ds.read_sidecar_part("dedup", 1)
    again = run_dedup(search_pool.root, threshold=THRESHOLD, summary=False)
    assert again["shards_written"] == [] and again["counts"]["total"] == 39
    os.unlink(ds.sidecar_uri("dedup", 1))
    redo = run_dedup(search_pool.root, threshold=THRESHOLD, summary=False)
    assert redo["shards_written"] == [1]
    assert ds.read_sidecar_part("dedup", 1).equals(part1)


def test_k_larger_than_the_pool_is_clamped_with_a_warning(search_pool):
    from webcurate.curation.dedup import run_dedup

    with pytest.warns(UserWarning, match="k=1000 is larger than"):
        result = run_dedup(search_pool.root, k=1000, threshold=THRESHOLD, summary=False)
    assert result["counts"]["removed:copy"] >= 11


def test_missing_embeddings_say_which_command_to_run(tmp_path, search_data):
    from webcurate.curation.dedup import run_dedup
    from webcurate.curation.vectors import EmbeddingError

    root = str(tmp_path / "raw")
    search_data.write_dataset(root, [search_data.Item("a", search_data.jpeg_bytes(search_data.make_photo(1)))], 4)
    with pytest.raises(EmbeddingError, match=r"no embeddings; run `webcurate embed --input"):
        run_dedup(root, summary=False)
    # exact needs no embeddings
    assert run_dedup(root, method="exact", summary=False)["counts"]["kept"] == 1


def test_nan_embeddings_are_refused_with_the_keys(search_pool):
    from webcurate.curation.dedup import run_dedup
    from webcurate.curation.vectors import EmbeddingError

    ds = Dataset(search_pool.root)
    t = ds.read_sidecar_part("embeddings", 0)
    vals = np.array(t["embedding"].to_pylist(), dtype=np.float16)
    vals[3, 5] = np.nan
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vals.reshape(-1), pa.float16()), vals.shape[1])
    ds.write_sidecar("embeddings", 0, t.set_column(1, "embedding", emb))
    with pytest.raises(EmbeddingError, match=f"1 embeddings hold NaN.*{t['key'][3].as_py()}"):
        run_dedup(search_pool.root, summary=False)


def test_against_dataset_of_another_dimension_is_refused(search_pool, tmp_path):
    from webcurate.curation.dedup import run_dedup
    from webcurate.curation.vectors import EmbeddingError

    other = str(tmp_path / "other")
    shutil.copytree(search_pool.root, other)
    _rewrite_embeddings(other, dim=64)
    with pytest.raises(EmbeddingError, match="dimensions differ.*320-d.*64-d"):
        run_dedup(search_pool.root, against=[other], summary=False)


def _rewrite_embeddings(root: str, dim: int) -> None:
    """Replace a dataset's embeddings by random ``dim``-d ones of another 'model'."""
    from webcurate.curation.embed import part_table
    from webcurate.shards import manifest as manifest_mod

    ds = Dataset(root)
    params = {"model": "other", "weights_sha256": "x", "dim": dim}
    manifest_mod.record_stage(root, "embeddings", params, model="other", dim=dim, weights_sha256="x")
    rng = np.random.default_rng(0)
    for s in ds.completed_shards():
        keys = ds.read_index(s, columns=["key"])["key"].to_pylist()
        rows = [{"key": k, "pos": i, "status": "ok", "error": "", "embedding": rng.normal(size=dim)}
                for i, k in enumerate(keys)]
        ds.write_sidecar("embeddings", s, part_table(rows, dim, "float32"))
        manifest_mod.record_shard(root, s, {"counts": {"total": len(keys)}}, stage="embeddings")


# --- array-level algorithms -------------------------------------------------
def _planted_vectors(n: int, d: int, pairs: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    src = rng.choice(n, pairs, replace=False)
    copies = x[src] + noise * rng.normal(size=(pairs, d)).astype(np.float32)
    x = np.concatenate([x, copies])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    truth = {(int(s), n + i) for i, s in enumerate(src)}
    return x, truth


def test_connected_components_match_a_sequential_union_find():
    from webcurate.curation.unionfind import UnionFind, connected_components

    rng = np.random.default_rng(3)
    n = 2000
    src, dst = rng.integers(0, n, 1500), rng.integers(0, n, 1500)
    labels = connected_components(n, src, dst)
    uf = UnionFind(n)
    for a, b in zip(src, dst):
        uf.union(int(a), int(b))
    roots = np.array([uf.find(i) for i in range(n)])
    # Same partition, and each label is the smallest member of its component.
    for r in np.unique(roots):
        members = np.flatnonzero(roots == r)
        assert (labels[members] == members.min()).all()
    assert len(np.unique(labels)) == len(np.unique(roots))


def test_copy_dedup_with_an_ivf_index_recovers_planted_pairs():
    from webcurate.curation.dedup import copy_dedup

    x, truth = _planted_vectors(6000, 128, 300, noise=0.35)
    rank = np.arange(len(x))  # originals (lower ids) preferred
    res = copy_dedup(x, rank, k=16, threshold=0.6, index_kind="ivf")
    assert res.index_kind == "ivf"
    found = {(int(res.dup_of[i]), int(i)) for i in np.flatnonzero(res.dup_of >= 0)}
    tp = len(found & truth)
    assert tp / len(truth) >= 0.95 and tp / max(len(found), 1) >= 0.99


def test_keep_first_policy_keeps_the_smallest_key():
    from webcurate.curation.dedup import copy_dedup, keep_rank

    x = np.array([[1, 0], [1, 0.01], [0, 1]], np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    keys = ["b", "a", "c"]
    res = copy_dedup(x, keep_rank(keys, np.array([100, 1, 5]), None, "first"), k=2, threshold=0.6)
    assert res.dup_of.tolist() == [1, -1, -1]
    res = copy_dedup(x, keep_rank(keys, np.array([100, 1, 5]), None, "largest"), k=2, threshold=0.6)
    assert res.dup_of.tolist() == [-1, 0, -1]


def test_semdedup_keeps_one_of_a_tight_group_and_spares_distinct_items():
    from webcurate.curation.dedup import semdedup

    rng = np.random.default_rng(1)
    base = rng.normal(size=(50, 32)).astype(np.float32)
    group = base[0] + 0.05 * rng.normal(size=(5, 32)).astype(np.float32)
    x = np.concatenate([base, group])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dup_of, sim, _ = semdedup(x, np.arange(len(x)), eps=0.05, n_clusters=4, block=3)
    assert set(np.flatnonzero(dup_of >= 0)) == set(range(50, 55))
    assert (dup_of[50:] == 0).all() and (sim[50:] >= 0.95).all()


def test_cli_dedup_prints_a_summary(search_pool):
    from click.testing import CliRunner

    from webcurate.curation.search_cli import dedup_cmd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = CliRunner().invoke(dedup_cmd, ["--input", search_pool.root, "--threshold", str(THRESHOLD), "--k", "8"])
    assert out.exit_code == 0, out.output
    assert "removed:copy" in out.output and "dedup (copy)" in out.output


def test_nprobe_over_every_ivf_cell_finds_exactly_the_flat_edges():
    from webcurate.curation import vectors

    x, _ = _planted_vectors(4000, 64, 200, noise=0.5)
    flat = vectors.knn_edges(x, 8, 0.6, choice=vectors.choose_index(len(x), kind="flat"))
    every = vectors.choose_index(len(x), kind="ivf", nprobe=10_000)
    assert every.nprobe == every.nlist, "nprobe must be capped at the number of cells"
    ivf_all = vectors.knn_edges(x, 8, 0.6, choice=every)
    one = vectors.choose_index(len(x), kind="ivf", nprobe=1)
    ivf_one = vectors.knn_edges(x, 8, 0.6, choice=one)
    as_set = lambda e: set(zip(e[0].tolist(), e[1].tolist()))  # noqa: E731
    assert as_set(ivf_all) == as_set(flat), "probing every cell must equal exact search"
    assert as_set(ivf_one) <= as_set(flat) and len(as_set(ivf_one)) <= len(as_set(flat))
