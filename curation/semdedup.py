"""SemDeDup (Abbas et al. 2023): spherical k-means, then inside each cluster drop near-copies of kept items.

Inside a cluster, samples are visited best-ranked first; one is dropped when
its max cosine to an already kept sample is >= 1 - eps (it then names that
sample). Clusters are independent, so as Ray work:

1. k-means trained on a seeded sample of the parts (all of them when they fit
   a task), then every part assigns its vectors (``assign_task``);
2. clusters are packed into groups that fit ``--memory-per-task``; each part
   splits its vectors by group (``emit_task``) and ``group_task`` runs the
   greedy pass of its clusters. Decisions are identical to one process given
   the same centroids.
"""
from __future__ import annotations

import math

import numpy as np

from .dedup_graph import PartPlan, load, sample_task
from .embedding_parts import normalized
from .exact_dedup import rank_of
from .ray_tasks import map_tasks, waves

KMEANS_MAX_POINTS_PER_CENTROID = 256


def spherical_kmeans(x: np.ndarray, k: int, seed: int, *, niter: int = 20, gpu: bool = False) -> np.ndarray:
    """Centroids (k, D) float32 of faiss's spherical k-means over ``x`` (N, D) normalised (k clamped to N)."""
    import faiss

    k = max(1, min(k, x.shape[0]))
    if k == 1:
        c = x.mean(axis=0, keepdims=True).astype(np.float32)
        return c / max(float(np.linalg.norm(c)), 1e-12)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False, gpu=gpu,
                      max_points_per_centroid=KMEANS_MAX_POINTS_PER_CENTROID, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N,) int64: the centroid of highest inner product for each row."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    out = np.empty(x.shape[0], dtype=np.int64)
    for s in range(0, x.shape[0], 65536):
        out[s:s + 65536] = index.search(np.ascontiguousarray(x[s:s + 65536], dtype=np.float32), 1)[1][:, 0]
    return out


def greedy_clusters(x: np.ndarray, rank: np.ndarray, assign: np.ndarray, eps: float,
                    block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The greedy pass of every cluster of ``assign``: ``(dup_of (N,) int64 -1 = kept, similarity (N,))``.

    Memory per step is (block x cluster size), never cluster size squared.
    """
    import faiss

    n, d = x.shape
    dup_of = np.full(n, -1, dtype=np.int64)
    sim = np.full(n, np.nan, dtype=np.float32)
    thr = np.float32(1.0 - eps)
    order = np.lexsort((rank, assign))  # by cluster, then preference
    for members in np.split(order, np.flatnonzero(np.diff(assign[order])) + 1):
        kept_index = faiss.IndexFlatIP(d)
        kept_ids: list[np.ndarray] = []
        for start in range(0, len(members), block):
            ids = members[start:start + block]
            xb = np.ascontiguousarray(x[ids])
            best = np.full(len(ids), -np.inf, dtype=np.float32)
            arg = np.full(len(ids), -1, dtype=np.int64)
            if kept_index.ntotal:
                s, i = kept_index.search(xb, 1)
                best, arg = s[:, 0].copy(), np.concatenate(kept_ids)[i[:, 0]]
            gram = xb @ xb.T
            keep = np.zeros(len(ids), dtype=bool)
            for t in range(len(ids)):  # sequential by definition: each decision depends on earlier keeps
                if best[t] >= thr:
                    continue
                keep[t] = True
                row = gram[t, t + 1:]
                better = row > best[t + 1:]
                best[t + 1:][better] = row[better]
                arg[t + 1:][better] = ids[t]
            dup_of[ids[~keep]] = arg[~keep]
            sim[ids[~keep]] = best[~keep]
            if keep.any():
                kept_index.add(xb[keep])
                kept_ids.append(ids[keep])
    return dup_of, sim


def semdedup(x: np.ndarray, rank: np.ndarray, *, eps: float = 0.07, n_clusters: int | None = None,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """SemDeDup of ``x`` (N, D) normalised in one process: ``(dup_of, similarity, clusters)``."""
    n = x.shape[0]
    if n < 2:
        return np.full(n, -1, np.int64), np.full(n, np.nan, np.float32), n
    centroids = spherical_kmeans(x, n_clusters or math.ceil(n / 1000), seed)
    dup_of, sim = greedy_clusters(x, rank, nearest_centroid(x, centroids), eps)
    return dup_of, sim, centroids.shape[0]


# -- as Ray work -------------------------------------------------------------------------------

def train_task(_: int, *, samples: list, k: int, seed: int, gpu: bool) -> np.ndarray:
    import ray

    return spherical_kmeans(np.concatenate(ray.get(samples)), k, seed, gpu=gpu)


def assign_task(shard: int, *, root: str, dim: int, centroids: np.ndarray, offset: int,
                exclude: np.ndarray) -> tuple:
    """``(cluster sizes, cluster of each row)`` of one part."""
    _, _, x = load(root, shard, dim, offset, exclude)
    a = nearest_centroid(x, centroids)
    return np.bincount(a, minlength=centroids.shape[0]), a


def emit_task(shard: int, *, root: str, dim: int, assigned, cluster_group: np.ndarray, groups: list[int],
              policy: str, offset: int, exclude: np.ndarray) -> tuple:
    """One part split by the cluster groups of one wave: gid, stored vector, cluster and keep-policy fields."""
    import ray

    part, gid, x = load(root, shard, dim, offset, exclude, stored=True)
    a = ray.get(assigned)
    keep = ~np.isin(part.rows, exclude)
    rows = part.rows[keep]
    keys = np.array(part.index.keys, dtype=object)[rows]
    out = []
    for g in groups:
        sel = cluster_group[a] == g
        out.append({"gid": gid[sel], "x": x[sel], "cluster": a[sel], "key": keys[sel].tolist(),
                    "pixels": part.index.pixels[rows][sel], "nbytes": part.index.nbytes[rows][sel]})
    return tuple(out) if len(groups) > 1 else out[0]


def group_task(group: int, *, buckets: list, eps: float, policy: str) -> tuple:
    """The greedy pass of one group's clusters: ``(dropped gid, kept gid, kept key, similarity)``."""
    import ray

    parts = [b for b in ray.get(buckets) if len(b["gid"])]
    if not parts:
        z = np.zeros(0, np.int64)
        return z, z, [], np.zeros(0, np.float32)
    gid = np.concatenate([b["gid"] for b in parts])
    x = normalized(np.concatenate([b["x"] for b in parts]))
    keys = [k for b in parts for k in b["key"]]
    rank = rank_of(keys, np.concatenate([b["pixels"] for b in parts]), np.concatenate([b["nbytes"] for b in parts]),
                   policy)
    dup_of, sim = greedy_clusters(x, rank, np.concatenate([b["cluster"] for b in parts]), eps)
    d = np.flatnonzero(dup_of >= 0)
    return gid[d], gid[dup_of[d]], [keys[i] for i in dup_of[d]], sim[d]


def _pack(sizes: np.ndarray, budget_rows: int) -> np.ndarray:
    """Clusters -> groups of at most ``budget_rows`` rows (a larger cluster gets a group of its own)."""
    out = np.zeros(len(sizes), dtype=np.int64)
    g, rows = 0, 0
    for c in range(len(sizes)):
        if rows and rows + sizes[c] > budget_rows:
            g, rows = g + 1, 0
        out[c] = g
        rows += sizes[c]
    return out


def semdedup_tasks(plan: PartPlan, *, eps: float, n_clusters: int | None, seed: int, policy: str,
                   memory: int, gpus: float = 0.0) -> tuple[tuple, dict]:
    """SemDeDup over the plan's parts: ``((dropped gid, kept gid, kept key, sim), info)``."""
    import ray

    live = plan.total - sum(len(v) for v in plan.exclude.values())
    kc = max(1, min(n_clusters or math.ceil(live / 1000), max(live, 1)))
    common = {"root": plan.root, "dim": plan.dim}
    per_part = {s: plan.part_args(s) for s in plan.shards}
    budget_rows = max(1024, memory // (4 * 4 * max(plan.dim, 1)))
    rate = min(1.0, budget_rows / max(live, 1))
    samples = map_tasks(sample_task, plan.shards, kwargs={**common, "rate": rate, "seed": seed}, per_item=per_part,
                        desc="sample", memory=memory, keep_refs=True)
    centroids = map_tasks(train_task, [0], kwargs={"samples": [samples[s] for s in plan.shards], "k": kc,
                                                   "seed": seed, "gpu": gpus > 0},
                          desc="k-means", memory=memory, gpus=gpus)[0]
    del samples
    assigned = map_tasks(assign_task, plan.shards, kwargs={**common, "centroids": centroids}, per_item=per_part,
                         desc="assign", memory=memory, num_returns=2, keep_refs=True)
    sizes = sum(ray.get(assigned[s][0]) for s in plan.shards)
    cluster_group = _pack(np.asarray(sizes), budget_rows)
    groups = int(cluster_group.max()) + 1 if len(cluster_group) else 1
    found: list[tuple] = []
    for wave in waves(groups, live * plan.dim * 4):
        emitted = map_tasks(emit_task, plan.shards, kwargs={**common, "cluster_group": cluster_group,
                                                            "groups": wave, "policy": policy},
                            per_item={s: {**per_part[s], "assigned": assigned[s][1]} for s in plan.shards},
                            desc="split by cluster", memory=memory, num_returns=len(wave), keep_refs=True)
        per_group = {g: {"buckets": [emitted[s][j] if len(wave) > 1 else emitted[s] for s in plan.shards]}
                     for j, g in enumerate(wave)}
        del emitted
        map_tasks(group_task, wave, kwargs={"eps": eps, "policy": policy}, per_item=per_group,
                  desc="semdedup", memory=memory, on_result=lambda _, r: found.append(r))
        del per_group
    del assigned
    out = (np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found]),
           [k for f in found for k in f[2]], np.concatenate([f[3] for f in found]))
    return out, {"clusters": int(centroids.shape[0]), "groups": groups}
