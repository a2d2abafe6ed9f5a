"""`webcurate dedup`: exact, copy (kNN graph + connected components), SemDeDup and --against, on
planted near-duplicates embedded by a real model (as Ray tasks), plus the array-level algorithms."""
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
    assert result.totals["kept"] == len(search_pool.originals)
    assert result.info["index"] == "flat" and result.info["threshold_source"] == "fixed"
    entry = Dataset(search_pool.root).manifest["stages"]["dedup"]
    assert entry["completed_shards"] == [0, 1, 2] and entry["parameters"]["threshold"] == THRESHOLD


def test_exact_dedup_groups_identical_bytes_only(search_pool):
    from webcurate.curation.dedup import run_dedup

    result = run_dedup(search_pool.root, method="exact", summary=False)
    rows = _decisions(search_pool.root)
    removed = {k: r["duplicate_of"] for k, r in rows.items() if not r["keep"]}
    assert removed == search_pool.exact
    assert all(rows[k]["reason"] == "exact" and rows[k]["similarity"] == 1.0 for k in removed)
    assert result.totals == {"total": 39, "kept": 37, "removed": 2, "removed:exact": 2}


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
    assert result.info["against_hits"] >= 4 and result.totals["removed:against"] == len(expected)


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
    assert not again.ran and again.totals["total"] == 39
    os.unlink(ds.sidecar_uri("dedup", 1))
    redo = run_dedup(search_pool.root, threshold=THRESHOLD, summary=False)
    assert sorted(redo.done) == [1] and redo.skipped == [0, 2]
    assert ds.read_sidecar_part("dedup", 1).equals(part1)


def test_k_larger_than_the_pool_is_clamped_with_a_warning(search_pool):
    from webcurate.curation.dedup import run_dedup

    with pytest.warns(UserWarning, match="k=1000 is larger than"):
        result = run_dedup(search_pool.root, k=1000, threshold=THRESHOLD, summary=False)
    assert result.totals["removed:copy"] >= 11


def test_missing_embeddings_say_which_command_to_run(tmp_path, search_data):
    from webcurate.curation.dedup import run_dedup
    from webcurate.curation.embedding_parts import EmbeddingError

    root = str(tmp_path / "raw")
    search_data.write_dataset(root, [search_data.Item("a", search_data.jpeg_bytes(search_data.make_photo(1)))], 4)
    with pytest.raises(EmbeddingError, match=r"no embeddings; run `webcurate embed --input"):
        run_dedup(root, summary=False)
    # exact needs no embeddings
    assert run_dedup(root, method="exact", summary=False).totals["kept"] == 1


def test_nan_embeddings_are_refused_with_the_keys(search_pool):
    from webcurate.curation.dedup import run_dedup
    from webcurate.curation.embedding_parts import EmbeddingError

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
    from webcurate.curation.embedding_parts import EmbeddingError

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


def test_components_join_every_edge_and_number_by_smallest_member():
    from webcurate.curation.components import components

    rng = np.random.default_rng(3)
    src, dst = rng.integers(0, 10**9, 1500), rng.integers(0, 10**9, 1500)
    src[:500] = dst[500:1000]  # chains, so components span several edges
    nodes, labels = components(src, dst, extra_nodes=np.array([7, 11]))
    assert np.array_equal(nodes, np.unique(np.concatenate([src, dst, [7, 11]])))
    at = lambda v: labels[np.searchsorted(nodes, v)]  # noqa: E731
    assert (at(src) == at(dst)).all(), "both ends of an edge share a component"
    # Labels count up in the order of each component's smallest node; isolated extras are their own.
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in range(labels.max() + 1)]
    assert firsts == sorted(firsts)
    assert len({at(np.array([7]))[0], at(np.array([11]))[0]}) == 2
    from scipy.sparse.csgraph import connected_components

    assert labels.max() + 1 == connected_components(_adjacency(nodes, src, dst), directed=False)[0]


def _adjacency(nodes, src, dst):
    from scipy.sparse import coo_matrix

    a, b = np.searchsorted(nodes, src), np.searchsorted(nodes, dst)
    return coo_matrix((np.ones(len(a)), (a, b)), shape=(len(nodes), len(nodes)))


def _copy_dedup(x, rank, k, threshold, kind="auto", nprobe=None):
    from webcurate.curation.components import keep_one_per_component
    from webcurate.curation.knn import choose_index, knn_edges_array

    src, dst, _ = knn_edges_array(x, k, threshold, choice=choose_index(len(x), kind=kind, nprobe=nprobe))
    return keep_one_per_component(len(x), src, dst, rank)


def test_copy_dedup_with_an_ivf_index_recovers_planted_pairs():
    x, truth = _planted_vectors(6000, 128, 300, noise=0.35)
    dup_of = _copy_dedup(x, np.arange(len(x)), 16, 0.6, kind="ivf")  # originals (lower ids) preferred
    found = {(int(dup_of[i]), int(i)) for i in np.flatnonzero(dup_of >= 0)}
    tp = len(found & truth)
    assert tp / len(truth) >= 0.95 and tp / max(len(found), 1) >= 0.99


def test_keep_first_policy_keeps_the_smallest_key():
    from webcurate.curation.exact_dedup import rank_of

    x = np.array([[1, 0], [1, 0.01], [0, 1]], np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    keys, px = ["b", "a", "c"], np.array([100, 1, 5])
    assert _copy_dedup(x, rank_of(keys, px, np.zeros(3), "first"), 2, 0.6).tolist() == [1, -1, -1]
    assert _copy_dedup(x, rank_of(keys, px, np.zeros(3), "largest"), 2, 0.6).tolist() == [-1, 0, -1]


def test_semdedup_keeps_one_of_a_tight_group_and_spares_distinct_items():
    from webcurate.curation.semdedup import greedy_clusters, semdedup

    rng = np.random.default_rng(1)
    base = rng.normal(size=(50, 32)).astype(np.float32)
    group = base[0] + 0.05 * rng.normal(size=(5, 32)).astype(np.float32)
    x = np.concatenate([base, group])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dup_of, sim, _ = semdedup(x, np.arange(len(x)), eps=0.05, n_clusters=4)
    assert set(np.flatnonzero(dup_of >= 0)) == set(range(50, 55))
    assert (dup_of[50:] == 0).all() and (sim[50:] >= 0.95).all()
    # Blocks smaller than a cluster decide the same (the greedy pass carries kept items across blocks).
    assign = np.zeros(len(x), dtype=np.int64)
    small = greedy_clusters(x, np.arange(len(x)), assign, 0.05, block=3)[0]
    assert np.array_equal(small, greedy_clusters(x, np.arange(len(x)), assign, 0.05)[0])


def test_cli_dedup_prints_a_summary(search_pool):
    from click.testing import CliRunner

    from webcurate.curation.cli import dedup

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = CliRunner().invoke(dedup, ["--input", search_pool.root, "--threshold", str(THRESHOLD), "--k", "8",
                                         "--no-report"])
    assert out.exit_code == 0, out.output
    assert "removed:copy" in out.output and "dedup (copy)" in out.output


def test_nprobe_over_every_ivf_cell_finds_exactly_the_flat_edges():
    from webcurate.curation import knn

    x, _ = _planted_vectors(4000, 64, 200, noise=0.5)
    flat = knn.knn_edges_array(x, 8, 0.6, choice=knn.choose_index(len(x), kind="flat"))
    every = knn.choose_index(len(x), kind="ivf", nprobe=10_000)
    assert every.nprobe == every.nlist, "nprobe must be capped at the number of cells"
    ivf_all = knn.knn_edges_array(x, 8, 0.6, choice=every)
    ivf_one = knn.knn_edges_array(x, 8, 0.6, choice=knn.choose_index(len(x), kind="ivf", nprobe=1))
    as_set = lambda e: set(zip(e[0].tolist(), e[1].tolist()))  # noqa: E731
    assert as_set(ivf_all) == as_set(flat), "probing every cell must equal exact search"
    assert as_set(ivf_one) <= as_set(flat) and len(as_set(ivf_one)) <= len(as_set(flat))
