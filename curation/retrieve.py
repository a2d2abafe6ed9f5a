"""``webcurate retrieve``: select pool samples close to seed datasets (DINOv2 recipe), as Ray tasks.

- ``sample``: each seed sample retrieves its ``k`` nearest pool samples
  (DINOv2: k=4, k=32 for small seed sets). Every pool part finds each seed's
  k best in the part (exact search); the driver keeps each seed's k best over
  the parts (S x k values), never the pool.
- ``cluster``: spherical k-means over the pool (trained on a seeded sample,
  all of it when it fits a task); every cluster holding more than
  ``min_seed_per_cluster`` seed samples gives up to ``per_cluster`` of its
  pool samples, those most similar to one of the cluster's seeds;
- ``both``: the union.

Seeds are datasets with embeddings from the same model (dim and weights
checked; another image size warns). They are small and broadcast to the
tasks. The pool leaves out what the ``dedup`` sidecar drops
(``exclude_duplicates``) when that sidecar exists.

Part columns: key, selected, score (cosine to the retrieving seed, null when
not selected), seed_key, seed_dataset, mode (sample|cluster|both). Every
embedded pool sample gets a row.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from webcurate.shards.errors import ConfigError
from webcurate.shards.stage import StageResult

from .embedding_parts import (EmbeddingError, check_compatible, embedding_set, mismatch_counts, mismatch_warning,
                              read_part)
from .ray_tasks import map_tasks
from .stage_params import RetrieveParams, TaskResources

STAGE = "retrieve"
SHIFT = 32  # pool sample id = shard << SHIFT | row among the shard's ok index rows


def pool_part(root: str, shard: int, dim: int, exclude_duplicates: bool):
    """A pool part's usable embeddings and the mask of those the dedup sidecar keeps."""
    part = read_part(root, shard, dim)
    keep = np.ones(len(part.rows), dtype=bool)
    if exclude_duplicates:
        from webcurate.shards.dataset import Dataset

        t = Dataset(root).read_sidecar_part("dedup", shard, columns=["key", "keep"])
        dropped = {k for k, v in zip(t["key"].to_pylist(), t["keep"].to_pylist()) if not v}
        keep = np.array([k not in dropped for k in part.keys], dtype=bool)
    return part, keep


def topk_task(shard: int, *, root: str, dim: int, seeds: np.ndarray, k: int, exclude_duplicates: bool) -> tuple:
    """Each seed's ``k`` best pool samples in one part: ``(sims (S, k), ids (S, k), pool rows in part)``."""
    import faiss

    part, keep = pool_part(root, shard, dim, exclude_duplicates)
    ids = (np.int64(shard) << SHIFT) | part.rows[keep]
    x = part.vectors[keep]
    kk = min(k, len(x))
    if kk == 0:
        return np.zeros((len(seeds), 0), np.float32), np.zeros((len(seeds), 0), np.int64), 0
    index = faiss.IndexFlatIP(dim)
    index.add(np.ascontiguousarray(x))
    s, i = index.search(np.ascontiguousarray(seeds), kk)
    return s, ids[i], len(x)


def merge_topk(best: tuple[np.ndarray, np.ndarray] | None, new: tuple[np.ndarray, np.ndarray],
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` best of two (S, *) score/id arrays (ties: smaller id first)."""
    s = new[0] if best is None else np.concatenate([best[0], new[0]], axis=1)
    i = new[1] if best is None else np.concatenate([best[1], new[1]], axis=1)
    order = np.lexsort((i, -s), axis=1)[:, :k] if s.shape[1] else np.zeros((s.shape[0], 0), np.int64)
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def best_per_item(scores: np.ndarray, ids: np.ndarray, seed_of: np.ndarray) -> tuple[np.ndarray, ...]:
    """Flattened hits -> each pool id once, with its best score and that seed: (ids, scores, seeds)."""
    order = np.lexsort((-scores, ids))
    ids, scores, seed_of = ids[order], scores[order], seed_of[order]
    first = np.r_[True, ids[1:] != ids[:-1]] if len(ids) else np.zeros(0, bool)
    return ids[first], scores[first], seed_of[first]


def sample_mode(root: str, shards: list[int], dim: int, seeds: np.ndarray, k: int, excl: bool,
                memory: int) -> tuple[tuple[np.ndarray, ...], int]:
    """Sample-based retrieval: ``((ids, scores, seed index), pool size)``."""
    state: dict[str, Any] = {"best": None, "pool": 0}

    def take(_: int, r: tuple) -> None:
        state["best"] = merge_topk(state["best"], r[:2], k)
        state["pool"] += r[2]

    map_tasks(topk_task, shards, kwargs={"root": root, "dim": dim, "seeds": seeds, "k": k,
                                         "exclude_duplicates": excl}, desc="retrieve", memory=memory,
              on_result=take)
    s, i = state["best"] if state["best"] is not None else (np.zeros((len(seeds), 0)), np.zeros((len(seeds), 0)))
    if k > state["pool"]:
        warnings.warn(f"k={k} is larger than the {state['pool']} vectors searched; using k={state['pool']}",
                      stacklevel=3)
    seed_of = np.repeat(np.arange(len(seeds)), s.shape[1])
    return best_per_item(s.reshape(-1).astype(np.float32), i.reshape(-1).astype(np.int64), seed_of), state["pool"]


def pool_sample_task(shard: int, *, root: str, dim: int, rate: float, seed: int, exclude_duplicates: bool) -> tuple:
    """``(pool rows in part, seeded share of them)`` for training the cluster-mode k-means."""
    part, keep = pool_part(root, shard, dim, exclude_duplicates)
    x = part.vectors[keep]
    return len(x), (x if rate >= 1 else x[np.random.default_rng([seed, shard]).random(len(x)) < rate])


def candidates_task(shard: int, *, root: str, dim: int, centroids: np.ndarray, chosen: np.ndarray,
                    seeds: np.ndarray, seed_cluster: np.ndarray, per_cluster: int,
                    exclude_duplicates: bool) -> list:
    """Per chosen cluster, this part's ``per_cluster`` members closest to one of its seeds."""
    from .semdedup import nearest_centroid

    part, keep = pool_part(root, shard, dim, exclude_duplicates)
    x = part.vectors[keep]
    ids = (np.int64(shard) << SHIFT) | part.rows[keep]
    a = nearest_centroid(x, centroids) if len(x) else np.zeros(0, np.int64)
    out = []
    for c in chosen:
        m = np.flatnonzero(a == c)
        if not len(m):
            continue
        sc = np.flatnonzero(seed_cluster == c)
        sims = x[m] @ seeds[sc].T
        j = sims.argmax(axis=1)
        best = sims[np.arange(len(m)), j]
        top = np.lexsort((ids[m], -best))[:per_cluster]
        out.append((int(c), best[top].astype(np.float32), ids[m][top], sc[j[top]]))
    return out


def cluster_mode(root: str, shards: list[int], dim: int, seeds: np.ndarray, params: RetrieveParams, excl: bool,
                 memory: int, pool_estimate: int) -> tuple[tuple[np.ndarray, ...], dict[str, int]]:
    """Cluster-based retrieval: ``((ids, scores, seed index), {clusters, clusters_selected})``."""
    from .semdedup import nearest_centroid, spherical_kmeans

    budget = max(1024, memory // (4 * 4 * max(dim, 1)))
    rate = min(1.0, budget / max(pool_estimate, 1))
    got = map_tasks(pool_sample_task, shards, kwargs={"root": root, "dim": dim, "rate": rate, "seed": params.seed,
                                                     "exclude_duplicates": excl}, desc="sample", memory=memory)
    n = sum(got[s][0] for s in shards)
    x = np.concatenate([got[s][1] for s in shards])
    del got
    kc = params.n_clusters or max(1, math.ceil(math.sqrt(n)))
    centroids = spherical_kmeans(x, kc, params.seed)
    del x
    seed_cluster = nearest_centroid(seeds, centroids)
    chosen = np.flatnonzero(np.bincount(seed_cluster, minlength=len(centroids)) > params.min_seed_per_cluster)
    best: dict[int, tuple] = {}

    def take(_: int, found: list) -> None:
        for c, s, i, w in found:
            if c in best:
                s, i, w = (np.concatenate([a, b]) for a, b in zip(best[c], (s, i, w)))
            top = np.lexsort((i, -s))[:params.per_cluster]
            best[c] = (s[top], i[top], w[top])

    map_tasks(candidates_task, shards, kwargs={"root": root, "dim": dim, "centroids": centroids, "chosen": chosen,
                                               "seeds": seeds, "seed_cluster": seed_cluster,
                                               "per_cluster": params.per_cluster, "exclude_duplicates": excl},
              desc="retrieve clusters", memory=memory, on_result=take)
    cat = [np.concatenate([v[j] for v in best.values()]) if best else np.zeros(0) for j in range(3)]
    ids, scores, seed_of = cat[1].astype(np.int64), cat[0].astype(np.float32), cat[2].astype(np.int64)
    return best_per_item(scores, ids, seed_of), {"clusters": int(len(centroids)), "clusters_selected": int(len(chosen)),
                                                 "pool_searched": int(n)}


def write_task(shard: int, *, root: str, dim: int, seed_keys: list, seed_roots: list,
               hits: dict | None = None) -> dict:
    """Write one shard's retrieve part: a row per embedded sample."""
    import pyarrow as pa

    from webcurate.shards.dataset import Dataset

    part = read_part(root, shard, dim)
    n = len(part.rows)
    sel, score = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.float32)
    seed_key, seed_ds, mode = (np.full(n, None, dtype=object) for _ in range(3))
    if hits is not None and len(hits["row"]):
        pos = np.full(int(max(part.rows.max(initial=-1), hits["row"].max())) + 1, -1, dtype=np.int64)
        pos[part.rows] = np.arange(n)
        at = pos[hits["row"]]
        sel[at], score[at], mode[at] = True, hits["score"], hits["mode"]
        seed_key[at] = np.array(seed_keys, dtype=object)[hits["seed"]]
        seed_ds[at] = np.array(seed_roots, dtype=object)[hits["seed"]]
    table = pa.table({"key": pa.array(part.keys, pa.string()), "selected": pa.array(sel, pa.bool_()),
                      "score": pa.array(score, pa.float32(), mask=~sel),
                      "seed_key": pa.array(seed_key.tolist(), pa.string()),
                      "seed_dataset": pa.array(seed_ds.tolist(), pa.string()),
                      "mode": pa.array(mode.tolist(), pa.string())})
    Dataset(root).write_sidecar(STAGE, shard, table)
    return {"counts": {"total": n, "selected": int(sel.sum()), **mismatch_counts(part)}}


def _seed_vectors(pool, roots: list[str]) -> tuple[np.ndarray, list[str], list[str], list]:
    vecs, keys, names, prints = [], [], [], []
    for root in roots:
        s = embedding_set(root, what="seed dataset")
        check_compatible(pool, s)
        prints.append(s.fingerprint())
        for shard in s.shards:
            p = read_part(root, shard, s.dim)
            vecs.append(p.vectors)
            keys += p.keys
            names += [root] * len(p.rows)
    x = np.concatenate(vecs) if vecs else np.zeros((0, pool.dim), np.float32)
    if len(x) == 0:
        raise EmbeddingError(f"the seed dataset(s) {', '.join(roots)} hold no embedded samples")
    return x, keys, names, prints


def _dedup_exclusion(ds, params: RetrieveParams) -> tuple[bool, str | None]:
    from webcurate.shards.global_stage import stage_run

    if not params.exclude_duplicates:
        return False, None
    have = ds.sidecar_completed("dedup")
    if have and set(have) >= set(ds.completed_shards()):
        return True, stage_run(ds.root, "dedup")
    if have:
        warnings.warn(f"{ds.root}: the dedup table is incomplete; retrieving from all samples", stacklevel=3)
    else:
        warnings.warn(f"{ds.root} has no dedup table; retrieving from all samples (run `webcurate dedup` first)",
                      stacklevel=3)
    return False, None


def run_retrieve(input: str, seeds: list[str] | None = None, *, summary: bool = True,
                 resources: TaskResources | dict | None = None, **options: Any) -> StageResult:
    """Retrieve pool samples of ``input`` near the seed datasets; write the ``retrieve`` sidecar.

    ``options`` are ``RetrieveParams`` fields. Zero selected samples is a
    result with a ``message`` saying why, not an error. ``totals``: total,
    selected; ``info``: pool, selected per mode, per seed dataset.
    """
    from webcurate.shards.dataset import Dataset
    from webcurate.shards.global_stage import GlobalStage, print_stage_table
    from webcurate.shards.params import parse

    if seeds is not None:
        options["seeds"] = list(seeds)
    params = parse(RetrieveParams, options, "retrieve")
    res = resources if isinstance(resources, TaskResources) else parse(TaskResources, resources or {}, "resources")
    if not params.seeds:
        raise ConfigError("give at least one --seeds DATASET")
    ds = Dataset(input)
    pool = embedding_set(input, what="pool dataset")
    seed_x, seed_keys, seed_roots, prints = _seed_vectors(pool, params.seeds)
    excl, dedup_run = _dedup_exclusion(ds, params)
    parameters = {**params.record(), "pool": pool.fingerprint(), "dedup": dedup_run, "seed_sets": prints}
    stage = GlobalStage(ds, STAGE, parameters, command="retrieve")
    if stage.is_complete():
        result = stage.skipped()
        if summary:
            print_stage_table(result, f"retrieve ({params.mode}): {ds.root}", [])
        return result
    stage.start()
    info: dict[str, Any] = {"seeds": int(len(seed_x)), "mode": params.mode}
    hits: dict[int, tuple] = {}  # pool id -> (score, seed, mode)
    pool_n = 0
    if params.mode in ("sample", "both"):
        (ids, s, w), pool_n = sample_mode(ds.root, pool.shards, pool.dim, seed_x, params.k, excl,
                                          res.task_memory())
        ok = np.ones(len(ids), bool) if params.min_score is None else s >= params.min_score
        for i, sc, se in zip(ids[ok], s[ok], w[ok]):
            hits[int(i)] = (float(sc), int(se), "sample")
        info["selected_sample"] = int(ok.sum())
    if params.mode in ("cluster", "both"):
        (ids, s, w), cinfo = cluster_mode(ds.root, pool.shards, pool.dim, seed_x, params, excl,
                                          res.task_memory(), pool.rows)
        info.update(cinfo)
        ok = np.ones(len(ids), bool) if params.min_score is None else s >= params.min_score
        info["selected_cluster"] = int(ok.sum())
        for i, sc, se in zip(ids[ok], s[ok], w[ok]):
            prev = hits.get(int(i))
            if prev is None:
                hits[int(i)] = (float(sc), int(se), "cluster")
            else:
                hits[int(i)] = (max(prev[0], float(sc)), prev[1] if prev[0] >= sc else int(se), "both")
    pool_n = pool_n or info.get("pool_searched", 0)
    _guard(params, len(hits), pool_n)
    message = _empty_message(params) if not hits else None
    if message:
        warnings.warn(message, stacklevel=2)
    result = stage.write_parts(write_task, per_shard=_per_shard(hits), memory=res.task_memory(),
                               kwargs={"dim": pool.dim, "seed_keys": seed_keys, "seed_roots": seed_roots})
    per_seed = {f"selected:{r}": sum(1 for _, se, _ in hits.values() if seed_roots[se] == r) for r in params.seeds}
    info["pool_searched"] = int(pool_n)
    result = stage.finish(result, summary=False, **info, **per_seed)
    result.message = message
    warning = mismatch_warning(result.totals, ds.root)
    if warning:
        result.warnings.append(warning)
    if summary:
        print_stage_table(result, f"retrieve ({params.mode}): {ds.root}",
                          [(k, v) for k, v in {**info, **per_seed}.items()])
    return result


def _guard(params: RetrieveParams, selected: int, pool: int) -> None:
    """Refuse to leave out more than ``max_removal`` of the pool (off by default: retrieval selects a subset)."""
    from .dedup import MassRemovalError

    left_out = 1 - selected / max(pool, 1)
    if left_out > params.max_removal and not params.allow_mass_removal:
        raise MassRemovalError(f"retrieve would leave out {pool - selected} of {pool} pool samples ({left_out:.1%}), "
                               f"more than --max-removal {params.max_removal:.0%}; nothing was written. Pass "
                               "--allow-mass-removal, or retrieve more (a larger --k, more seeds).")


def _per_shard(hits: dict[int, tuple]) -> dict[int, dict]:
    ids = np.array(sorted(hits), dtype=np.int64)
    shard = ids >> SHIFT
    out = {}
    for s in np.unique(shard):
        sel = ids[shard == s]
        out[int(s)] = {"hits": {"row": sel & ((1 << SHIFT) - 1),
                                "score": np.array([hits[int(i)][0] for i in sel], np.float32),
                                "seed": np.array([hits[int(i)][1] for i in sel], np.int64),
                                "mode": np.array([hits[int(i)][2] for i in sel], dtype=object)}}
    return out


def _empty_message(params: RetrieveParams) -> str:
    if params.mode == "cluster":
        return (f"no pool cluster holds more than {params.min_seed_per_cluster} seed samples, so nothing was "
                "retrieved; try --mode sample, fewer --n-clusters, a lower --min-seed-per-cluster, or more seeds")
    if params.min_score is not None:
        return f"no pool sample reached --min-score {params.min_score}; nothing was retrieved"
    return "nothing was retrieved"
