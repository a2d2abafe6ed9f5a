"""kNN graphs with faiss: the search pieces, in one process or partitioned over Ray tasks.

The graph of a pool: every sample's ``k`` nearest other samples whose cosine
is above a threshold (vectors are L2-normalised, so inner product = cosine).

Search (``search_block``) is the same for both ways of running it:

- exact (``flat``): every query against every database vector;
- IVF: vectors live in the cell of their nearest coarse centroid (spherical
  k-means on a sample); a query scans only its ``nprobe`` nearest cells. On
  CPU the scan is one BLAS product per cell (``scan_cells``: the queries
  probing the cell times its vectors), not faiss's per-vector list scan;
  on GPU it is a faiss IVF index.

Partitioned (``plan_groups`` + ``merge_edges``, driven by ``dedup_graph.py``):
the *database* is split into groups of whole cells (cells near each other in
one group, sized by ``--memory-per-task``); each query goes to the groups that
hold one of its probed cells, searches only those cells there, and keeps its
local top ``k+1`` less itself. The driver merges each query's local lists and
keeps the best ``k`` others: exactly what one IVF index with all cells returns, as
every probed cell is complete in the group that holds it. Exact search is the
same with groups of arbitrary database blocks that every query visits.

Memory per task is (group database + its queries) x D x 4 bytes; the driver
holds centroids and the edges above the threshold, never an N x N matrix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from webcurate.shards.errors import ConfigError

# Exact search up to this many vectors in auto mode (flat kNN of N queries
# costs N^2 D, about 10 s at 30k x 384 on 2 cores, and grows fast).
FLAT_MAX = 30_000
# Queries per faiss call: bounds the result block to chunk x k.
SEARCH_CHUNK = 16_384
# Similarities per matrix product in ``scan_cells`` (queries x cell vectors): 16 MiB of float32.
CELL_BLOCK = 1 << 22
# IVF cells: Lloyd iterations and training points per cell (enough to place
# cells; training stays a fraction of the search).
IVF_NITER = 10
IVF_TRAIN_PER_LIST = 20


@dataclass(frozen=True)
class IndexChoice:
    """How to search N vectors: exact ``flat``, or ``ivf`` with ``nlist`` cells probed ``nprobe`` at a time."""

    kind: str  # "flat" | "ivf"
    nlist: int = 0
    nprobe: int = 0
    train_size: int = 0


def choose_index(n: int, *, kind: str = "auto", nlist: int | None = None, nprobe: int | None = None) -> IndexChoice:
    """Flat for ``n <= FLAT_MAX`` (or ``kind="flat"``), else IVF.

    IVF defaults: nlist = 4 sqrt(N) (4000 at 1M), nprobe = 10. A query costs
    nlist x D (finding its cells) plus nprobe x N/nlist x D (scanning them);
    at 4 sqrt(N) cells the two are about equal, and finer cells follow the
    data's concepts closely, which keeps near-duplicates within the probed
    cells (bench/dedup_1m.py measures the recall against exact search).
    """
    if kind not in ("auto", "flat", "ivf"):
        raise ConfigError(f"index kind must be auto, flat or ivf, got {kind!r}")
    if kind == "flat" or (kind == "auto" and n <= FLAT_MAX):
        return IndexChoice("flat")
    nl = int(nlist or max(16, min(65536, 4 * int(math.sqrt(n)))))
    nl = max(1, min(nl, n // 8 or 1))
    npb = int(nprobe or 10)
    return IndexChoice("ivf", nl, min(npb, nl), min(n, IVF_TRAIN_PER_LIST * nl))


def train_cells(sample: np.ndarray, nlist: int, seed: int, *, gpu: bool = False) -> np.ndarray:
    """Spherical k-means centroids (nlist, D) float32 of ``sample`` (M, D) normalised."""
    import faiss

    km = faiss.Kmeans(sample.shape[1], nlist, niter=IVF_NITER, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=IVF_TRAIN_PER_LIST, min_points_per_centroid=1, gpu=gpu)
    km.train(np.ascontiguousarray(sample, dtype=np.float32))
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def probes(x: np.ndarray, centroids: np.ndarray, nprobe: int, *, gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``nprobe`` nearest cells of each row: ids (N, nprobe) int32 (column 0 = own cell), sims float32."""
    import faiss

    index = to_gpu(faiss.IndexFlatIP(centroids.shape[1]), gpu)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    ids = np.empty((x.shape[0], nprobe), dtype=np.int32)
    sims = np.empty((x.shape[0], nprobe), dtype=np.float32)
    for s in range(0, x.shape[0], 4 * SEARCH_CHUNK):
        d, i = index.search(np.ascontiguousarray(x[s:s + 4 * SEARCH_CHUNK], dtype=np.float32), nprobe)
        ids[s:s + len(i)], sims[s:s + len(i)] = i, d
    return ids, sims


def faiss_gpus() -> int:
    """GPUs faiss can use in this process (0 with faiss-cpu)."""
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def to_gpu(index, gpu: bool):
    """``index`` on every GPU of this process when asked and faiss has GPU support, else unchanged."""
    if not gpu or faiss_gpus() == 0:
        return index
    import faiss

    return faiss.index_cpu_to_all_gpus(index)


def search_block(db_x: np.ndarray, db_gid: np.ndarray, q_x: np.ndarray, q_gid: np.ndarray, kk: int,
                 threshold: float, *, centroids: np.ndarray | None = None, db_cell: np.ndarray | None = None,
                 q_probe: tuple[np.ndarray, np.ndarray] | None = None,
                 gpu: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's ``kk`` best database vectors of this block with cosine > ``threshold``, self-hits dropped.

    Flat when ``centroids`` is None; else IVF over the global ``centroids``,
    the database holding whole cells (``db_cell``, (M,) int) and each query
    scanning the cells of its ``q_probe`` (ids, sims) that are in this block
    (``scan_cells`` on CPU, a faiss IVF index on GPU). Returns ``(query gid,
    database gid, sim)`` arrays. A query finds itself in one block only;
    dropping it here rather than in ``merge_edges`` keeps the driver's merge
    input O(edges), not O(N) (every sample is its own best hit).
    """
    import faiss

    d = db_x.shape[1]
    kk = max(1, min(kk, db_x.shape[0]))
    if db_x.shape[0] == 0 or q_x.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    db_x = np.ascontiguousarray(db_x, dtype=np.float32)
    if centroids is not None and not (gpu and faiss_gpus()):
        return scan_cells(db_x, db_gid, np.asarray(db_cell), q_x, q_gid, q_probe[0], kk, threshold)
    if centroids is None:
        index = to_gpu(faiss.IndexFlatIP(d), gpu)
        index.add(db_x)
    else:
        from faiss.contrib.ivf_tools import add_preassigned

        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
        index = faiss.IndexIVFFlat(quantizer, d, centroids.shape[0], faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True
        add_preassigned(index, db_x, np.ascontiguousarray(db_cell, dtype=np.int64))
        index.nprobe = q_probe[0].shape[1]
        index = to_gpu(index, gpu)  # the GPU finds the same nearest cells itself; absent ones are empty
    qs, ds, ss = [], [], []
    for s in range(0, q_x.shape[0], SEARCH_CHUNK):
        q = np.ascontiguousarray(q_x[s:s + SEARCH_CHUNK], dtype=np.float32)
        sims, ids = index.search(q, kk)
        qg = q_gid[s:s + SEARCH_CHUNK]
        hit = db_gid[np.maximum(ids, 0)]
        keep = (ids >= 0) & (sims > threshold) & (hit != qg[:, None])
        rows = np.broadcast_to(np.arange(len(q))[:, None], ids.shape)[keep]
        qs.append(qg[rows])
        ds.append(hit[keep])
        ss.append(sims[keep])
    return np.concatenate(qs).astype(np.int64), np.concatenate(ds).astype(np.int64), np.concatenate(ss)


def _top_per_query(q: np.ndarray, d: np.ndarray, s: np.ndarray, kk: int) -> tuple[np.ndarray, ...]:
    """Each query's ``kk`` best (q, d, s) hits: by similarity, ties to the lower database index."""
    order = np.lexsort((d, -s, q))
    q, d, s = q[order], d[order], s[order]
    start = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
    rank = np.arange(len(q)) - np.repeat(start, np.diff(np.r_[start, len(q)]))
    keep = rank < kk
    return q[keep], d[keep], s[keep]


def scan_cells(db_x: np.ndarray, db_gid: np.ndarray, db_cell: np.ndarray, q_x: np.ndarray, q_gid: np.ndarray,
               probe_i: np.ndarray, kk: int, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IVF search on CPU as one matrix product per cell: the queries probing a cell times its vectors.

    ``db_x`` (M, D) float32 with cells ``db_cell`` (M,); ``q_x`` (Nq, D) with
    probed cells ``probe_i`` (Nq, nprobe); probed cells this block does not
    hold (and -1 entries) are skipped. Returns what faiss ``IndexIVFFlat.search`` with the same probes
    returns, less self-hits and hits at or below ``threshold``: each query's
    ``kk`` best vectors of its probed cells (ties to the lower database row).
    faiss scans a list one vector at a time (about 3 GFLOP/s per core
    here); the per-cell product runs in BLAS, 6x less CPU on 200k x 384
    with the same edges (bench/results/curation_scale.md).
    """
    order = np.argsort(db_cell, kind="stable")
    cells = db_cell[order]
    dbx = db_x[order]
    nq, nprobe = probe_i.shape
    cell = probe_i.reshape(-1)
    qrow = np.repeat(np.arange(nq, dtype=np.int64), nprobe)
    valid = cell >= 0
    by_cell = np.argsort(cell[valid], kind="stable")
    cell, qrow = cell[valid][by_cell], qrow[valid][by_cell]
    ucell, c0 = np.unique(cell, return_index=True)
    c1 = np.r_[c0[1:], len(cell)]
    d0, d1 = np.searchsorted(cells, ucell, "left"), np.searchsorted(cells, ucell, "right")
    hits: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    held, bound = 0, max(4 * kk * nq, 1 << 22)
    for a, b, lo, hi in zip(c0, c1, d0, d1):
        if hi == lo:
            continue
        vecs = dbx[lo:hi]
        step = max(1, CELL_BLOCK // (hi - lo))
        for s in range(a, b, step):
            rows = qrow[s:min(b, s + step)]
            sim = np.ascontiguousarray(q_x[rows], dtype=np.float32) @ vecs.T
            if kk < sim.shape[1]:  # only a query's kk best of this cell can be among its kk best overall
                col = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
                sim = np.take_along_axis(sim, col, axis=1)
                keep = sim > threshold
                r, c = np.broadcast_to(rows[:, None], col.shape)[keep], col[keep] + lo
            else:
                keep = sim > threshold
                ri, c = np.nonzero(keep)
                r, c = rows[ri], c + lo
            hits.append((r, c, sim[keep]))
            held += len(r)
        if held > bound:  # compact: the heavy-overlap case (near-identical pools) stays O(kk x Nq)
            hits = [_top_per_query(*map(np.concatenate, zip(*hits)), kk)]
            held = len(hits[0][0])
    if not hits:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    r, c, sim = _top_per_query(*map(np.concatenate, zip(*hits)), kk)
    qg, dg = np.asarray(q_gid)[r], np.asarray(db_gid)[order[c]]
    keep = qg != dg
    return qg[keep].astype(np.int64), dg[keep].astype(np.int64), sim[keep].astype(np.float32)


def merge_edges(q: np.ndarray, d: np.ndarray, s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep each query's ``k`` best hits over all blocks, return undirected edges once.

    Inputs are the concatenated outputs of ``search_block`` (searched with
    k + 1, self-hits already dropped: k others remain). Returns
    ``(src, dst, sim)`` with src < dst, sorted by (src, dst).
    """
    if len(q) == 0 or k < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    q, d, s = _top_per_query(q, d, s, k)  # per query: best first; ties by id, like one faiss index
    a, b = np.minimum(q, d), np.maximum(q, d)
    order = np.lexsort((b, a))
    a, b, s = a[order], b[order], s[order]
    first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])]
    return a[first], b[first], s[first].astype(np.float32)


def group_cells(centroids: np.ndarray, sizes: np.ndarray, groups: int, seed: int = 0) -> np.ndarray:
    """(nlist,) int: the group of each cell; nearby cells share a group, groups hold similar counts.

    Cells are clustered by their centroids (so a query's probed cells mostly
    sit in one group), then assigned largest first to the nearest group with
    room left (1.15 x the mean size), which keeps the biggest task small.
    """
    import faiss

    nlist = centroids.shape[0]
    groups = max(1, min(groups, nlist))
    if groups == 1:
        return np.zeros(nlist, dtype=np.int64)
    km = faiss.Kmeans(centroids.shape[1], groups, niter=20, seed=seed, spherical=True, verbose=False,
                      min_points_per_centroid=1)
    km.train(np.ascontiguousarray(centroids, dtype=np.float32))
    pref = np.argsort(-(centroids @ km.centroids.T), axis=1)
    cap = 1.15 * max(float(sizes.sum()), 1.0) / groups
    load = np.zeros(groups)
    out = np.empty(nlist, dtype=np.int64)
    for c in np.argsort(-sizes, kind="stable"):
        choice = next((g for g in pref[c] if load[g] + sizes[c] <= cap), int(np.argmin(load)))
        out[c] = choice
        load[choice] += sizes[c]
    return out


def knn_edges_array(x: np.ndarray, k: int, threshold: float, *, choice: IndexChoice | None = None,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The thresholded kNN graph of ``x`` (N, D) normalised in this process: the partitioned search with one group.

    Returns ``(src, dst, sim)`` with src < dst, each undirected edge once.
    """
    n = x.shape[0]
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    choice = choice or choose_index(n)
    kk = min(k + 1, n)
    gid = np.arange(n, dtype=np.int64)
    if choice.kind == "flat":
        return merge_edges(*search_block(x, gid, x, gid, kk, threshold), kk - 1)
    rng = np.random.default_rng(seed)
    sample = x if choice.train_size >= n else x[np.sort(rng.choice(n, choice.train_size, replace=False))]
    centroids = train_cells(sample, choice.nlist, seed)
    pi, pd = probes(x, centroids, choice.nprobe)
    return merge_edges(*search_block(x, gid, x, gid, kk, threshold, centroids=centroids, db_cell=pi[:, 0],
                                     q_probe=(pi, pd)), kk - 1)
