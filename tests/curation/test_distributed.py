"""The global stages as Ray tasks decide what one process decides, however the work is cut.

A small ``--memory-per-task`` splits the kNN search into many cell groups and
database blocks, the k-means into a sample plus per-part assignment, the
balanced selection into histogram passes; the decisions must not change
(the in-process array functions are the reference) and must be the same
bytes run after run.
"""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

from helpers import load_helper
from webcurate.shards.dataset import Dataset

sp = load_helper(pathlib.Path(__file__).with_name("synthetic_pool.py"))
SMALL = {"memory_per_task": "16MiB"}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """6,000 x 128 float16 vectors around 50 concepts, 200 planted copies, 10 shards (index-only)."""
    root = str(tmp_path_factory.mktemp("dist") / "pool")
    x, orig, copy = sp.planted_vectors(6000, 128, 200, seed=3)
    keys = sp.write_pool(root, x, 600)
    return root, sp.stored(x), keys, orig, copy


def _copy_of(root: str) -> dict[str, str]:
    return {r["key"]: r["duplicate_of"] for r in Dataset(root).read_sidecar("dedup").to_pylist() if r["reason"] == "copy"}


def _reference(x: np.ndarray, keys: list[str], k: int, threshold: float) -> dict[str, str]:
    from webcurate.curation.components import keep_one_per_component
    from webcurate.curation.exact_dedup import rank_of
    from webcurate.curation.knn import choose_index, knn_edges_array

    src, dst, _ = knn_edges_array(x, k, threshold, choice=choose_index(len(x), kind="flat"))
    rank = rank_of(keys, np.full(len(keys), 64 * 48), np.arange(len(keys)) % 600 % 97 + 1000, "largest")
    dup_of = keep_one_per_component(len(x), src, dst, rank)
    return {keys[i]: keys[d] for i, d in enumerate(dup_of) if d >= 0}


def test_exact_search_cut_into_blocks_gives_the_one_process_components(pool, tmp_path):
    import shutil

    from webcurate.curation.dedup import run_dedup

    root, x, keys, *_ = pool
    copy = str(tmp_path / "pool")
    shutil.copytree(root, copy)
    result = run_dedup(copy, k=16, threshold=0.6, index="flat", resources=SMALL, summary=False)
    assert result.info["tasks"] > 1, "the pool must not fit one exact-search task at 16MiB"
    assert _copy_of(copy) == _reference(x, keys, 16, 0.6)


def test_ivf_groups_probing_every_cell_equal_exact_search_and_defaults_keep_recall(pool, tmp_path):
    import shutil

    from webcurate.curation.dedup import run_dedup

    root, x, keys, orig, copy_ids = pool
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    shutil.copytree(root, a)
    shutil.copytree(root, b)
    every = run_dedup(a, k=16, threshold=0.6, index="ivf", nprobe=10_000, resources=SMALL, summary=False)
    assert every.info["groups"] > 1 and every.info["nprobe"] == every.info["nlist"]
    assert _copy_of(a) == _reference(x, keys, 16, 0.6)
    default = run_dedup(b, k=16, threshold=0.6, index="ivf", resources=SMALL, summary=False)
    found = _copy_of(b)
    planted = {(keys[c], keys[o]) for o, c in zip(orig, copy_ids)}
    pairs = {(k, v) for k, v in found.items()} | {(v, k) for k, v in found.items()}
    assert len(planted & pairs) >= 0.95 * len(planted)
    assert set(found.items()) <= set(_reference(x, keys, 16, 0.6).items()) | set(found.items())


@pytest.mark.parametrize("method", ["copy", "semdedup"])
def test_decisions_do_not_depend_on_how_parts_are_blocked_and_no_scratch_is_left(pool, tmp_path, monkeypatch,
                                                                                method):
    """One producer block or one per part: the same decision bytes; the scratch folder is gone after."""
    import shutil

    from webcurate.curation import dedup_graph, scratch
    from webcurate.curation.dedup import run_dedup
    from webcurate.shards import storage

    root, *_ = pool
    outs, blocks = [], []
    for name, per_cpu in (("few", 1), ("many", 1000)):
        monkeypatch.setattr(dedup_graph, "BLOCKS_PER_CPU", per_cpu)
        d = str(tmp_path / name)
        shutil.copytree(root, d)
        res = run_dedup(d, method=method, k=8, threshold=0.6, index="ivf", n_clusters=12, resources=SMALL,
                        summary=False)
        blocks.append(res.info["blocks"])
        outs.append([storage.read_bytes(Dataset(d).sidecar_uri("dedup", s)) for s in range(10)])
        assert storage.list_dir(storage.join(d, scratch.SCRATCH_DIR)) == []
    assert blocks[0] < blocks[1] == 10
    assert outs[0] == outs[1]


def test_a_rerun_writes_the_same_bytes(pool, tmp_path):
    import shutil

    from webcurate.curation.dedup import run_dedup
    from webcurate.shards import storage

    root, *_ = pool
    outs = []
    for name in ("r1", "r2"):
        d = str(tmp_path / name)
        shutil.copytree(root, d)
        run_dedup(d, k=8, threshold=0.6, index="ivf", resources=SMALL, summary=False)
        outs.append([storage.read_bytes(Dataset(d).sidecar_uri("dedup", s)) for s in (0, 4, 9)])
    assert outs[0] == outs[1]


def test_cluster_on_all_points_equals_one_process_hierarchical_kmeans(tmp_path):
    from webcurate.curation.cluster import run_cluster
    from webcurate.curation.kmeans import assign, hierarchical_kmeans

    root = str(tmp_path / "pool")
    x, _, _ = sp.planted_vectors(3000, 64, 0, seed=5)
    keys = sp.write_pool(root, x, 250)
    run_cluster(root, levels="20,4", resampling_steps=3, seed=2, summary=False)
    got = {r["key"]: (r["level_1"], r["level_2"]) for r in Dataset(root).read_sidecar("clusters").to_pylist()}
    hier = hierarchical_kmeans(sp.stored(x), [20, 4], resampling_steps=3, seed=2, progress=False)
    labels = hier.labels()
    assert all(got[k] == tuple(labels[i]) for i, k in enumerate(keys))
    a, _ = assign(sp.stored(x), hier.levels[0].centroids, approximate=False)
    assert np.array_equal(a, labels[:, 0])


def test_cluster_trained_on_a_sample_refines_over_every_part(tmp_path):
    from webcurate.curation.cluster import run_cluster

    root = str(tmp_path / "pool")
    x, _, _ = sp.planted_vectors(12_000, 128, 0, seed=6, concepts=30)
    sp.write_pool(root, x, 2000)
    res = run_cluster(root, levels="600,30", resampling_steps=0, seed=0, resources=SMALL, summary=False)
    assert res.info["sampled"] < 12_000 and res.totals["clustered"] == 12_000
    assert [lv["k"] for lv in res.info["levels"]] == [600, 30] and res.info["levels"][0]["non_empty"] > 500
    from webcurate.curation import scratch
    from webcurate.shards import storage

    assert storage.list_dir(storage.join(root, scratch.SCRATCH_DIR)) == [], "the sample files are removed"


@pytest.mark.parametrize("strategy", ["closest", "random"])
def test_balanced_selection_by_priority_cuts_matches_the_one_process_shares(tmp_path, monkeypatch, strategy):
    from webcurate.curation import sample as sample_mod
    from webcurate.curation.cluster import run_cluster
    from webcurate.curation.water_fill import balanced_sample

    root = str(tmp_path / "pool")
    x, _, _ = sp.planted_vectors(4000, 32, 0, seed=7, concepts=12)
    sp.write_pool(root, x, 300)
    run_cluster(root, levels="40,6", resampling_steps=2, seed=1, summary=False)
    monkeypatch.setattr(sample_mod, "COLLECT_MAX", 50)  # force histogram passes before collecting
    sample_mod.run_sample(root, 1000, strategy=strategy, seed=4, summary=False)
    t = Dataset(root).read_sidecar("clusters").to_pylist()
    chosen = {r["key"] for r in Dataset(root).read_sidecar("sample").to_pylist() if r["selected"]}
    labels = np.array([[r["level_1"], r["level_2"]] for r in t])
    dist = np.array([r["distance"] for r in t])
    ref = balanced_sample(labels, 1000, distance=dist, strategy=strategy, seed=4)
    assert len(chosen) == 1000
    got = np.array([r["key"] in chosen for r in t])
    # Same share for every level-1 cluster; "closest" also the same members.
    assert np.array_equal(np.bincount(labels[got, 0], minlength=40), np.bincount(labels[ref, 0], minlength=40))
    if strategy == "closest":
        assert np.array_equal(got, ref)
