"""The partitioned kNN search's pieces: self-hits stay in the tasks, cell groups fit their task budget."""
from __future__ import annotations

import numpy as np


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_search_block_returns_no_self_hit_even_among_exact_copies():
    from webcurate.curation import knn

    base = _unit(50, 16, 0)
    x = np.concatenate([base, base, base])  # every vector has two exact copies: ties at cosine 1.0
    gid = np.arange(len(x), dtype=np.int64)
    q, d, s = knn.search_block(x, gid, x, gid, 3, 0.5)
    assert not np.any(q == d), "a query's own row must not leave the task"
    assert np.bincount(q, minlength=len(x)).max() <= 3
    src, dst, _ = knn.merge_edges(q, d, s, 2)
    got = set(zip(src.tolist(), dst.tolist()))
    want = {(i + a * 50, i + b * 50) for i in range(50) for a in range(3) for b in range(3) if a < b}
    assert got == want, "each row's 2 best others are its two copies"


def test_merge_keeps_each_querys_k_best_over_blocks():
    from webcurate.curation import knn

    x = _unit(400, 8, 1)
    gid = np.arange(len(x), dtype=np.int64)
    one = knn.merge_edges(*knn.search_block(x, gid, x, gid, 6, -1.0), 5)
    halves = [knn.search_block(x[sl], gid[sl], x, gid, 6, -1.0) for sl in (slice(0, 200), slice(200, 400))]
    split = knn.merge_edges(*(np.concatenate(parts) for parts in zip(*halves)), 5)
    assert set(zip(one[0].tolist(), one[1].tolist())) == set(zip(split[0].tolist(), split[1].tolist()))


def test_group_rows_counts_a_query_once_per_group():
    from webcurate.curation.dedup_graph import group_rows

    cell_group = np.array([0, 0, 1, 1])
    sizes = np.array([10, 20, 30, 40])
    probes = np.array([[0, 1], [0, 2], [2, 3], [3, 3]])  # row 0 probes two cells of group 0
    rows = group_rows(cell_group, sizes, probes, 1.0, 2)
    assert rows.tolist() == [30 + 2, 70 + 3]


def test_size_groups_fits_the_budget_where_three_times_the_database_does_not():
    """Queries probing 10 scattered cells visit many groups: the 3x rule of thumb overflows, the estimate fits."""
    from webcurate.curation.dedup_graph import group_rows, size_groups

    rng = np.random.default_rng(0)
    nlist, n = 256, 200_000
    centroids = _unit(nlist, 16, 2)
    home = rng.integers(0, nlist, n)
    probes = np.concatenate([home[:, None], rng.integers(0, nlist, (n, 9))], axis=1)
    sizes = np.bincount(home, minlength=nlist)
    budget = 60_000
    naive = int(np.ceil(3 * n / budget))
    from webcurate.curation import knn

    naive_rows = group_rows(knn.group_cells(centroids, sizes, naive, 0), sizes, probes, 1.0, naive)
    assert naive_rows.max() > budget, "the case must overflow the old sizing"
    sample = probes[rng.random(n) < 0.1]
    cell_group, groups, est = size_groups(centroids, sizes, sample, n / len(sample), budget, 0)
    true_rows = group_rows(cell_group, sizes, probes, 1.0, groups)
    assert groups > naive
    assert true_rows.max() <= budget * 1.05, (true_rows.max(), est)
    assert abs(est - true_rows.max()) <= 0.05 * true_rows.max()


def test_size_groups_keeps_every_cpu_busy_when_one_group_would_fit():
    """A budget that one group fits still gets ``min_groups`` groups: one uneven group must not run alone."""
    from webcurate.curation.dedup_graph import size_groups

    rng = np.random.default_rng(1)
    nlist, n = 64, 20_000
    home = rng.integers(0, nlist, n)
    sizes = np.bincount(home, minlength=nlist)
    probes = home[:, None]
    _, groups, _ = size_groups(_unit(nlist, 16, 3), sizes, probes, 1.0, 10 * n, 0)
    assert groups == 1
    cell_group, groups, _ = size_groups(_unit(nlist, 16, 3), sizes, probes, 1.0, 10 * n, 0, min_groups=4)
    assert groups == 4 and set(cell_group.tolist()) == {0, 1, 2, 3}


def test_min_task_groups_scales_with_cluster_cpus_not_for_small_data(ray_local):
    from webcurate.curation.dedup_graph import GROUPS_PER_CPU, MIN_GROUP_ROWS, min_task_groups
    from webcurate.shards.ray_runtime import cluster_cpus

    assert min_task_groups(MIN_GROUP_ROWS - 1) == 1
    assert min_task_groups(10**9) == int(GROUPS_PER_CPU * cluster_cpus())


def test_memory_per_task_auto_is_a_cpus_share_of_the_smallest_node(ray_local):
    import ray

    from webcurate.curation.stage_params import AUTO_TASK_MEMORY, TaskResources

    res = TaskResources()
    assert res.memory_per_task == "auto"
    node = next(n["Resources"] for n in ray.nodes() if n["Alive"])
    share = node["memory"] / node["CPU"]
    assert res.task_memory() == int(min(max(share, AUTO_TASK_MEMORY[0]), AUTO_TASK_MEMORY[1]))
    assert TaskResources(memory_per_task="64MiB").task_memory() == 64 << 20


def _faiss_ivf_hits(x, gid, centroids, pi, pd, kk, threshold):
    """What one faiss IndexIVFFlat over all cells returns for the same probes, self-hits dropped."""
    import faiss
    from faiss.contrib.ivf_tools import add_preassigned

    quantizer = faiss.IndexFlatIP(x.shape[1])
    quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], centroids.shape[0], faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    add_preassigned(index, x, pi[:, 0].astype(np.int64))
    index.nprobe = pi.shape[1]
    sims, ids = index.search_preassigned(x, kk, pi.astype(np.int64), pd.astype(np.float32))
    keep = (ids >= 0) & (sims > threshold) & (ids != gid[:, None])
    rows = np.broadcast_to(gid[:, None], ids.shape)
    return rows[keep], ids[keep], sims[keep]


def test_cell_products_find_the_edges_faiss_ivf_finds():
    """The per-cell matrix products are a faster scan, not another search: the same edges as faiss's IVF
    over the same probes, on a pool with planted near-copies, and when every query has more than k hits."""
    from webcurate.curation import knn

    rng = np.random.default_rng(5)
    centres = _unit(40, 32, 6)
    x = centres[rng.integers(0, 40, 6000)] + 0.6 * _unit(6000, 32, 7)
    x[:300] = x[300:600] + 0.05 * _unit(300, 32, 8)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    gid = np.arange(len(x), dtype=np.int64)
    centroids = knn.train_cells(x, 64, 0)
    pi, pd = knn.probes(x, centroids, 6)
    for kk, threshold in ((9, 0.9), (9, 0.3), (65, 0.5)):  # planted copies; then k binds for every query
        ours = knn.scan_cells(x, gid, pi[:, 0], x, gid, pi, kk, threshold)
        ref = _faiss_ivf_hits(x, gid, centroids, pi, pd, kk, threshold)
        assert len(ours[0]) > 500 and len(ours[0]) == len(ref[0])
        # Per query the same similarities; ids may differ only among hits tied (to float rounding)
        # with the query's k-th best, where faiss and BLAS round the last bit differently.
        for q, d, sim in (ours, ref):
            order = np.lexsort((-sim, q))
            q[:], d[:], sim[:] = q[order], d[order], sim[order]
        np.testing.assert_array_equal(ours[0], ref[0])
        np.testing.assert_allclose(ours[2], ref[2], atol=1e-5)
        mine, theirs = set(zip(ours[0].tolist(), ours[1].tolist())), set(zip(ref[0].tolist(), ref[1].tolist()))
        kth = {int(q): float(sim) for q, sim in zip(ours[0], ours[2])}  # sorted best first: the last is the k-th
        for q, d in mine ^ theirs:
            assert abs(float(x[q] @ x[d]) - kth[q]) < 1e-5, "only k-th place ties may differ"
        assert len(mine ^ theirs) <= 0.001 * len(mine)
    # Only the cells this block holds are scanned: probes elsewhere are -1.
    half = pi[:, 0] < 32
    ours = knn.search_block(x[half], gid[half], x, gid, 9, 0.3, centroids=centroids, db_cell=pi[half, 0],
                            q_probe=(pi, pd))
    assert np.all(pi[ours[1], 0] < 32) and len(ours[0]) > 0
