"""SemDeDup (Abbas et al. 2023): spherical k-means, then inside each cluster drop near-copies of kept items.

Inside a cluster, samples are visited best-ranked first; one is dropped when
its max cosine to an already kept sample is >= 1 - eps (it then names that
sample). Clusters are independent, so as Ray work:

1. k-means trained on a seeded sample of the parts (all of them when they fit
   a task), then every part assigns its vectors (``assign_task``);
2. clusters are packed into groups that fit ``--memory-per-task``; each block
   of parts splits its vectors by group into one scratch file (``emit_task``,
   scratch.py) and ``group_task`` runs the greedy pass of its clusters. Decisions are identical to one process given
   the same centroids.
"""
from __future__ import annotations

import math

import numpy as np

from . import scratch
from .dedup_graph import PartPlan, load, producer_blocks, sample_task
from .embedding_parts import normalized
from .exact_dedup import rank_of
from .ray_tasks import map_tasks

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

def train_task(_: int, *, samples: list[str], k: int, seed: int, gpu: bool) -> np.ndarray:
    """k-means centroids (k, D) float32 of the sample files, concatenated in block order."""
    return spherical_kmeans(np.concatenate([scratch.read_batch(u, 0)["x"] for u in samples]), k, seed, gpu=gpu)


def assign_task(block: int, *, shards: list[int], out: str, centroids: np.ndarray, root: str, dim: int,
                plan_args: dict) -> np.ndarray:
    """Write the cluster of each row of a block of parts to ``out``; return the cluster sizes (k,)."""
    a = [nearest_centroid(load(root, s, dim, **plan_args[s])[2], centroids) for s in shards]
    a = np.concatenate(a) if a else np.zeros(0, np.int64)
    scratch.write_batches(out, [{"a": a}])
    return np.bincount(a, minlength=centroids.shape[0])


def emit_task(block: int, *, shards: list[int], assigned: str, out: str, cluster_group: np.ndarray,
              groups: list[int], policy: str, root: str, dim: int, plan_args: dict) -> int:
    """Split a block by the cluster groups of one wave into ``out`` (batch j = group ``groups[j]``):
    gid, stored vector, cluster and keep-policy fields. Bytes written."""
    a = scratch.read_batch(assigned, 0)["a"]
    cols: dict[str, list] = {"gid": [], "x": [], "key": [], "pixels": [], "nbytes": []}
    for s in shards:
        part, gid, x = load(root, s, dim, **plan_args[s], stored=True)
        rows = part.rows[~np.isin(part.rows, plan_args[s]["exclude"])]
        for name, v in (("gid", gid), ("x", x), ("key", np.array(part.index.keys, dtype=object)[rows]),
                        ("pixels", part.index.pixels[rows]), ("nbytes", part.index.nbytes[rows])):
            cols[name].append(v)
    cat = {k: np.concatenate(v) for k, v in cols.items()} if shards else {}
    batches = []
    for g in groups:
        sel = cluster_group[a] == g
        batches.append({"gid": cat["gid"][sel], "x": cat["x"][sel], "cluster": a[sel], "key": cat["key"][sel],
                        "pixels": cat["pixels"][sel], "nbytes": cat["nbytes"][sel]})
    return scratch.write_batches(out, batches)


def group_task(group: int, *, buckets: list[str], j: int, eps: float, policy: str) -> tuple:
    """The greedy pass of one group's clusters (batch ``j`` of every block's split file):
    ``(dropped gid, kept gid, kept key, similarity)``."""
    parts = list(scratch.read_batches(buckets, j))
    if not parts:
        z = np.zeros(0, np.int64)
        return z, z, [], np.zeros(0, np.float32)
    gid = np.concatenate([b["gid"] for b in parts])
    x = normalized(np.concatenate([b["x"] for b in parts]))
    keys = [k for b in parts for k in b["key"].tolist()]
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
    live = plan.total - sum(len(v) for v in plan.exclude.values())
    kc = max(1, min(n_clusters or math.ceil(live / 1000), max(live, 1)))
    read = {"root": plan.root, "dim": plan.dim}
    budget_rows = max(1024, memory // (4 * 4 * max(plan.dim, 1)))
    blocks = producer_blocks(plan, budget_rows)
    nb = len(blocks)
    per_block = plan.block_items(blocks)
    found: list[tuple] = []
    with scratch.Scratch(plan.root, "semdedup") as tmp:
        sample_uri = [tmp.file("sample", f"{b:06d}.arrow") for b in range(nb)]
        assigned_uri = [tmp.file("assigned", f"{b:06d}.arrow") for b in range(nb)]
        map_tasks(sample_task, range(nb), kwargs={**read, "rate": min(1.0, budget_rows / max(live, 1)), "seed": seed},
                  per_item={b: {**per_block[b], "out": sample_uri[b]} for b in range(nb)}, desc="sample",
                  memory=memory, on_result=lambda *_: None)
        centroids = map_tasks(train_task, [0], kwargs={"samples": sample_uri, "k": kc, "seed": seed, "gpu": gpus > 0},
                              desc="k-means", memory=memory, gpus=gpus)[0]
        tmp.drop("sample")
        sizes = np.zeros(centroids.shape[0], np.int64)

        def add(_, r: np.ndarray) -> None:
            sizes[:] += r

        map_tasks(assign_task, range(nb), kwargs={**read, "centroids": centroids},
                  per_item={b: {**per_block[b], "out": assigned_uri[b]} for b in range(nb)}, desc="assign",
                  memory=memory, on_result=add)
        cluster_group = _pack(sizes, budget_rows)
        groups = int(cluster_group.max()) + 1 if len(cluster_group) else 1
        for w, wave in enumerate(scratch.waves(plan.root, groups, live * (plan.dim * 2 + 64))):
            split_uri = [tmp.file(f"wave{w}", f"{b:06d}.arrow") for b in range(nb)]
            map_tasks(emit_task, range(nb), kwargs={**read, "cluster_group": cluster_group, "groups": wave,
                                                    "policy": policy},
                      per_item={b: {**per_block[b], "assigned": assigned_uri[b], "out": split_uri[b]}
                                for b in range(nb)}, desc="split by cluster", memory=memory, on_result=lambda *_: None)
            map_tasks(group_task, wave, kwargs={"buckets": split_uri, "eps": eps, "policy": policy},
                      per_item={g: {"j": j} for j, g in enumerate(wave)}, desc="semdedup", memory=memory,
                      on_result=lambda _, r: found.append(r))
            tmp.drop(f"wave{w}")
    out = (np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found]),
           [k for f in found for k in f[2]], np.concatenate([f[3] for f in found]))
    return out, {"clusters": int(centroids.shape[0]), "groups": groups, "blocks": nb}
