"""``webcurate retrieve``: select pool samples close to seed datasets (DINOv2 recipe).

- ``sample``: each seed sample retrieves its ``k`` nearest pool samples
  (DINOv2: k=4, k=32 for small seed sets);
- ``cluster``: spherical k-means over the pool; every cluster holding more
  than ``min_seed_per_cluster`` seed samples gives up to ``per_cluster`` of
  its pool samples (those most similar to the cluster's seeds);
- ``both``: the union.

Seeds are our own datasets with an ``embeddings`` sidecar from the same model
(same dim and weights, checked). The pool leaves out samples the ``dedup``
sidecar drops (``exclude_duplicates``), when that sidecar exists.

Part columns: key, selected (bool), score (cosine to the retrieving seed,
null when not selected), seed_key, seed_dataset, mode (sample|cluster|both).
Every embedded pool sample gets a row.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Any

import numpy as np

from webcurate.shards.errors import ConfigError

from . import vectors

STAGE = "retrieve"
MODES = ("sample", "cluster", "both")


def sample_retrieval(pool: np.ndarray, seeds: np.ndarray, k: int, *, index_kind: str = "auto",
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k nearest pool items of every seed row.

    pool (N, D), seeds (S, D) normalised. Returns score (N,) float32, the best
    cosine to a seed that retrieved the item (-inf when none did), and
    seed_idx (N,) int64 that seed's row (-1 when none).
    """
    n = pool.shape[0]
    score = np.full(n, -np.inf, dtype=np.float32)
    seed_idx = np.full(n, -1, dtype=np.int64)
    if n == 0 or seeds.shape[0] == 0:
        return score, seed_idx
    k = vectors.clamp_k(k, n, "k")
    index = vectors.build_index(pool, vectors.choose_index(n, kind=index_kind), seed=seed)
    sims, ids = vectors.search(index, seeds, k, desc="retrieve")
    flat_ids, flat_s = ids.reshape(-1), sims.reshape(-1)
    flat_seed = np.repeat(np.arange(seeds.shape[0], dtype=np.int64), k)
    valid = flat_ids >= 0
    flat_ids, flat_s, flat_seed = flat_ids[valid], flat_s[valid], flat_seed[valid]
    # Best seed per pool item: sort by (item, -score), take each item's first.
    order = np.lexsort((-flat_s, flat_ids))
    flat_ids, flat_s, flat_seed = flat_ids[order], flat_s[order], flat_seed[order]
    first = np.ones(len(flat_ids), dtype=bool)
    first[1:] = flat_ids[1:] != flat_ids[:-1]
    score[flat_ids[first]] = flat_s[first]
    seed_idx[flat_ids[first]] = flat_seed[first]
    return score, seed_idx


def cluster_retrieval(pool: np.ndarray, seeds: np.ndarray, *, n_clusters: int | None = None,
                      per_cluster: int = 100, min_seed_per_cluster: int = 3,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Cluster-based retrieval.

    k-means over pool (N, D) (default ceil(sqrt(N)) clusters); seeds (S, D)
    are assigned to their nearest centroid; from each cluster holding more
    than ``min_seed_per_cluster`` seeds, up to ``per_cluster`` pool members
    with the highest cosine to one of the cluster's seeds are taken. Returns
    score (N,), seed_idx (N,) as ``sample_retrieval`` and counts (clusters,
    clusters_selected).
    """
    n = pool.shape[0]
    score = np.full(n, -np.inf, dtype=np.float32)
    seed_idx = np.full(n, -1, dtype=np.int64)
    if n == 0 or seeds.shape[0] == 0:
        return score, seed_idx, {"clusters": 0, "clusters_selected": 0}
    if per_cluster < 1:
        raise ConfigError(f"--per-cluster must be at least 1, got {per_cluster}")
    kc = n_clusters or max(1, math.ceil(math.sqrt(n)))
    centroids, assign = vectors.kmeans(pool, kc, seed=seed)
    kc = centroids.shape[0]
    _, s_assign = vectors.search(vectors.build_index(centroids, vectors.IndexChoice("flat")), seeds, 1)
    s_assign = s_assign[:, 0]
    seed_counts = np.bincount(s_assign, minlength=kc)
    chosen = np.flatnonzero(seed_counts > min_seed_per_cluster)
    order = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[order], np.arange(kc + 1))
    for c in chosen:
        members = order[bounds[c]:bounds[c + 1]]
        if len(members) == 0:
            continue
        seeds_c = np.flatnonzero(s_assign == c)
        best = np.full(len(members), -np.inf, dtype=np.float32)
        arg = np.full(len(members), -1, dtype=np.int64)
        for start in range(0, len(seeds_c), 4096):  # (members x 4096) block at a time
            sc = seeds_c[start:start + 4096]
            sims = pool[members] @ seeds[sc].T
            j = sims.argmax(axis=1)
            s = sims[np.arange(len(members)), j]
            better = s > best
            best[better], arg[better] = s[better], sc[j[better]]
        top = np.argsort(-best, kind="stable")[:per_cluster]
        score[members[top]] = best[top]
        seed_idx[members[top]] = arg[top]
    return score, seed_idx, {"clusters": int(kc), "clusters_selected": int(len(chosen))}


def run_retrieve(
    input: str,
    seeds: list[str],
    *,
    k: int = 4,
    mode: str = "sample",
    n_clusters: int | None = None,
    per_cluster: int = 100,
    min_seed_per_cluster: int = 3,
    exclude_duplicates: bool = True,
    min_score: float | None = None,
    seed: int = 0,
    summary: bool = True,
) -> dict[str, Any]:
    """Retrieve pool samples of ``input`` near the seed datasets; write the ``retrieve`` sidecar.

    ``min_score`` (optional) drops hits whose cosine is below it. Zero
    selected samples is a result with a ``message`` saying why, not an
    error. Returns counts (pool, selected, per mode, per seed dataset).
    """
    import pyarrow as pa

    from webcurate.shards.progress import print_table
    from webcurate.shards import manifest as manifest_mod
    from webcurate.shards.dataset import Dataset

    t0 = time.time()
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not seeds:
        raise ConfigError("give at least one --seed DATASET")
    ds = Dataset(input)
    pool_all = vectors.read_embeddings(input, what="pool dataset")
    seed_sets = []
    for root in seeds:
        s = vectors.read_embeddings(root, what="seed dataset")
        vectors.check_compatible(pool_all, s)
        seed_sets.append(s)
    seed_x = np.concatenate([s.vectors for s in seed_sets]) if seed_sets else np.zeros((0, pool_all.dim), np.float32)
    seed_keys = np.array([k_ for s in seed_sets for k_ in s.keys], dtype=object)
    seed_root = np.array([s.root for s in seed_sets for _ in range(s.n)], dtype=object)
    if seed_x.shape[0] == 0:
        raise vectors.EmbeddingError(f"the seed dataset(s) {', '.join(seeds)} hold no embedded samples")

    # Pool: embedded samples, minus what dedup dropped.
    in_pool = np.ones(pool_all.n, dtype=bool)
    dedup_info: dict[str, Any] | None = None
    excluded = 0
    if exclude_duplicates:
        if set(ds.sidecar_completed("dedup")) >= set(ds.completed_shards()) and ds.has_sidecar("dedup"):
            t = ds.read_sidecar("dedup", columns=["key", "keep"])
            dropped = {key for key, kp in zip(t["key"].to_pylist(), t["keep"].to_pylist()) if not kp}
            in_pool = np.array([key not in dropped for key in pool_all.keys], dtype=bool)
            excluded = int((~in_pool).sum())
            dedup_info = {"parameters": ds.manifest["stages"]["dedup"].get("parameters"), "excluded": excluded}
        elif ds.has_sidecar("dedup"):
            warnings.warn(f"{input}: the dedup table is incomplete; retrieving from all samples", stacklevel=2)
        else:
            warnings.warn(f"{input} has no dedup table; retrieving from all samples (run `webcurate dedup` first)",
                          stacklevel=2)
    pool_pos = np.flatnonzero(in_pool)
    pool_x = np.ascontiguousarray(pool_all.vectors[pool_pos])
    if len(pool_pos) == 0:
        raise vectors.EmbeddingError(f"the pool {input} has no samples left to retrieve from")

    parameters = {
        "seeds": list(seeds), "mode": mode, "k": k, "n_clusters": n_clusters, "per_cluster": per_cluster,
        "min_seed_per_cluster": min_seed_per_cluster, "exclude_duplicates": exclude_duplicates,
        "min_score": min_score, "pool": pool_all.fingerprint(), "dedup": dedup_info,
        "seed_sets": [s.fingerprint() for s in seed_sets],
    }
    manifest_mod.record_stage(ds.root, STAGE, parameters)
    ds.reload()
    shards = ds.completed_shards()
    done = set(ds.sidecar_completed(STAGE))
    todo = [s for s in shards if s not in done]

    score = np.full(pool_all.n, -np.inf, dtype=np.float32)
    who = np.full(pool_all.n, -1, dtype=np.int64)
    by = np.full(pool_all.n, None, dtype=object)
    info: dict[str, Any] = {"pool": int(len(pool_pos)), "excluded_duplicates": excluded, "seeds": int(seed_x.shape[0])}
    if todo:
        if mode in ("sample", "both"):
            s, w = sample_retrieval(pool_x, seed_x, k, seed=seed)
            hit = w >= 0 if min_score is None else (w >= 0) & (s >= min_score)
            score[pool_pos[hit]], who[pool_pos[hit]], by[pool_pos[hit]] = s[hit], w[hit], "sample"
            info["selected_sample"] = int(hit.sum())
        if mode in ("cluster", "both"):
            s, w, cinfo = cluster_retrieval(pool_x, seed_x, n_clusters=n_clusters, per_cluster=per_cluster,
                                            min_seed_per_cluster=min_seed_per_cluster, seed=seed)
            info.update(cinfo)
            hit = w >= 0 if min_score is None else (w >= 0) & (s >= min_score)
            info["selected_cluster"] = int(hit.sum())
            tgt = pool_pos[hit]
            both = by[tgt] == "sample"
            better = s[hit] > score[tgt]
            score[tgt[better]], who[tgt[better]] = s[hit][better], w[hit][better]
            by[tgt] = np.where(both, "both", "cluster")
    selected = who >= 0

    message = None
    if todo and not selected.any():
        if mode == "cluster":
            message = (f"no pool cluster holds more than {min_seed_per_cluster} seed samples, so nothing was "
                       "retrieved; try --mode sample, fewer --n-clusters, a lower --min-seed-per-cluster, "
                       "or more seed samples")
        else:
            message = (f"no pool sample reached --min-score {min_score}; nothing was retrieved"
                       if min_score is not None else "nothing was retrieved")
        warnings.warn(message, stacklevel=2)

    keys = np.array(pool_all.keys, dtype=object)
    seed_key_col = np.where(selected, seed_keys[np.maximum(who, 0)], None)
    seed_ds_col = np.where(selected, seed_root[np.maximum(who, 0)], None)
    order = np.argsort(pool_all.shards, kind="stable")
    shard_sorted = pool_all.shards[order]
    starts = np.searchsorted(shard_sorted, todo, side="left")
    ends = np.searchsorted(shard_sorted, todo, side="right")

    def part(rows: np.ndarray) -> pa.Table:
        sel = selected[rows]
        return pa.table({
            "key": pa.array(keys[rows].tolist(), pa.string()),
            "selected": pa.array(sel, pa.bool_()),
            "score": pa.array(np.where(sel, score[rows], 0).astype(np.float32), pa.float32(), mask=~sel),
            "seed_key": pa.array(seed_key_col[rows].tolist(), pa.string()),
            "seed_dataset": pa.array(seed_ds_col[rows].tolist(), pa.string()),
            "mode": pa.array(by[rows].tolist(), pa.string()),
        })

    def stats(rows: np.ndarray) -> dict[str, Any]:
        return {"counts": {"total": int(len(rows)), "selected": int(selected[rows].sum())}}

    vectors.write_sidecar_parts(ds, STAGE, todo, [order[a:b] for a, b in zip(starts, ends)], part, stats)
    manifest_mod.record_stage(ds.root, STAGE, parameters, finished=manifest_mod.now_iso(),
                              **{k_: v for k_, v in info.items() if k_ != "pool"})
    ds.reload()
    if todo:
        per_seed = {f"selected:{r}": int(np.sum(seed_ds_col == r)) for r in seeds}
        counts = {"total": int(pool_all.n), "selected": int(selected.sum()), **per_seed}
    else:  # nothing recomputed: report what the finished run recorded
        counts = dict(ds.manifest["stages"][STAGE].get("counts", {}))
    result = {"stage": STAGE, "root": ds.root, "mode": mode, "counts": counts, **info,
              "shards_written": todo, "shards_skipped": sorted(done), "seconds": round(time.time() - t0, 3),
              "message": message}
    if summary:
        rows = [(k_, v) for k_, v in counts.items()]
        rows += [(k_, v) for k_, v in info.items()]
        rows.append(("shards written / skipped", f"{len(todo)} / {len(done)}"))
        rows.append(("seconds", f"{result['seconds']:.1f}"))
        if message:
            rows.append(("note", message))
        print_table(f"retrieve ({mode}): {ds.root}", rows, ("what", "count"))
    return result
