"""``webcurate sample``: balanced sampling of a clustered dataset to a target size, as Ray tasks.

1. ``counts_task``: every part counts its clustered samples per level-1
   cluster; the driver adds them up and water-fills ``target`` over the
   hierarchy (``water_fill.shares_from_level1_counts``, the same shares the
   one-process ``balanced_sample`` gives): each level-1 cluster's share.
2. Inside a level-1 cluster the share goes to the samples of lowest
   *priority*: distance to the centroid (``closest``), a seeded hash of the key
   (``random``), or a score-weighted draw (``--weight-by``). The cut of every
   cluster is found without gathering its members: ``histogram_task`` counts
   the next 8 bits of the priorities of each cluster's undecided samples,
   the driver narrows each cluster to one bucket, and once few samples are
   undecided ``collect_task`` brings exactly those; the driver holds
   (clusters x 256) counts at most.
3. ``write_task``: every part writes ``<root>/sample/part-<shard>.parquet``
   (key, selected) for every key of its clusters part (keys not clustered,
   e.g. dedup-removed ones, are not selected).
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Any

import numpy as np

from webcurate.shards.dataset import Dataset, DatasetError
from webcurate.shards.stage import StageResult

from .cluster import STAGE as CLUSTERS, STATUS_OK, level_columns, load_centroids, load_parents
from .ray_tasks import map_tasks
from .stage_params import SampleParams, TaskResources
from .water_fill import shares_from_level1_counts, size_entropy

STAGE = "sample"
DIGIT = 8
COLLECT_MAX = 1_000_000  # undecided samples brought to the driver at the end, at most
ALL = np.uint64(np.iinfo(np.uint64).max)


def _hash64(keys: list[str], seed: int) -> np.ndarray:
    return np.fromiter((int.from_bytes(hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest(), "big")
                        for k in keys), dtype=np.uint64, count=len(keys))


def priorities(keys: list[str], distance: np.ndarray, strategy: str, seed: int,
               scores: np.ndarray | None = None) -> np.ndarray:
    """(n,) uint64, lowest taken first: monotone in distance / hash / score-weighted key."""
    h = _hash64(keys, seed)
    if scores is not None:  # Efraimidis-Spirakis: Exp(1) / score, smallest first
        u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        key = -np.log1p(-u) / np.maximum(scores, 1e-12)
        key = np.where(np.isnan(scores), np.inf, key)
        return key.astype(np.float64).view(np.uint64)  # non-negative floats keep their order as bits
    if strategy == "random":
        return h
    q = (np.clip(np.nan_to_num(distance, nan=2.0), 0.0, 2.0) / 2.0 * (2 ** 32 - 1)).astype(np.uint64)
    return (q << np.uint64(32)) | (h >> np.uint64(32))


def candidates(root: str, shard: int, p: dict[str, Any]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """One clusters part: keys, level-1 cluster, candidate mask (clustered, scores above floors), priority."""
    from .quality_params import score_stage

    ds = Dataset(root)
    t = ds.read_sidecar_part(CLUSTERS, shard, columns=["key", "status", "level_1", "distance"])
    keys = t["key"].to_pylist()
    ok = np.asarray(t["status"].to_pylist(), dtype=object) == STATUS_OK
    scores = {}
    for name in [*p["floors"], *([p["weight_by"]] if p["weight_by"] else [])]:
        s = ds.read_sidecar_part(score_stage(name), shard, columns=["key", "score"])
        got = dict(zip(s["key"].to_pylist(), s["score"].to_pylist()))
        scores[name] = np.array([np.nan if got.get(k) is None else got[k] for k in keys], dtype=np.float64)
    for name, floor in p["floors"].items():
        ok &= np.nan_to_num(scores[name], nan=-np.inf) >= floor
    weights = scores.get(p["weight_by"]) if p["weight_by"] else None
    if weights is not None and np.nanmin(np.where(ok, weights, 0), initial=0.0) < 0:
        from webcurate.shards.errors import ConfigError

        raise ConfigError(f"score-weighted sampling needs scores >= 0 (`{p['weight_by']}` has negative ones; "
                          "use a sigmoid/softmax activation)")
    prio = priorities(keys, t["distance"].to_numpy(zero_copy_only=False), p["strategy"], p["seed"], weights)
    return keys, t["level_1"].to_numpy(zero_copy_only=False).astype(np.int64), ok, prio


def counts_task(shard: int, *, root: str, p: dict, k1: int) -> np.ndarray:
    _, level1, ok, _ = candidates(root, shard, p)
    return np.bincount(level1[ok], minlength=k1)


def _undecided(level1: np.ndarray, ok: np.ndarray, prio: np.ndarray, active: np.ndarray, prefix: np.ndarray,
               fixed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the active clusters whose top ``fixed`` priority bits equal their cluster's prefix: (rows, slot)."""
    slot = np.full(max(int(level1.max(initial=-1)), int(active.max(initial=-1))) + 1, -1, np.int64)
    slot[active] = np.arange(len(active))
    c = np.where(ok & (level1 >= 0), slot[np.maximum(level1, 0)], -1)
    rows = np.flatnonzero(c >= 0)
    if fixed:
        low = np.uint64(64 - fixed)
        rows = rows[(prio[rows] >> low) == (prefix[c[rows]] >> low)]
    return rows, c[rows]


def histogram_task(shard: int, *, root: str, p: dict, active: np.ndarray, prefix: np.ndarray, fixed: int) -> np.ndarray:
    """(len(active), 256) counts of the next 8 priority bits among each active cluster's undecided samples."""
    _, level1, ok, prio = candidates(root, shard, p)
    rows, slot = _undecided(level1, ok, prio, active, prefix, fixed)
    digit = ((prio[rows] >> np.uint64(64 - fixed - DIGIT)) & np.uint64((1 << DIGIT) - 1)).astype(np.int64)
    out = np.zeros((len(active), 1 << DIGIT), dtype=np.int64)
    np.add.at(out, (slot, digit), 1)
    return out


def collect_task(shard: int, *, root: str, p: dict, active: np.ndarray, prefix: np.ndarray, fixed: int) -> tuple:
    """``(cluster, priority, key)`` of every undecided sample of the active clusters in one part."""
    keys, level1, ok, prio = candidates(root, shard, p)
    rows, _ = _undecided(level1, ok, prio, active, prefix, fixed)
    return level1[rows], prio[rows], [keys[i] for i in rows]


def thresholds(root: str, shards: list[int], p: dict, share: np.ndarray, counts: np.ndarray,
               memory: int) -> tuple[np.ndarray, dict[int, str]]:
    """Per level-1 cluster the cut ``(priority, key)``: samples at or below it are selected.

    Returns (k1,) uint64 limits (all ones = take all) and ``{cluster: key}`` for
    clusters whose cut falls inside one priority value (ties go by key).
    """
    limit = np.where(share >= counts, ALL, np.uint64(0)).astype(np.uint64)
    last_key: dict[int, str] = {}
    cut = np.flatnonzero((share > 0) & (share < counts))
    need = share[cut].astype(np.int64)
    prefix = np.zeros(len(cut), dtype=np.uint64)
    fixed, undecided = 0, int(counts[cut].sum())
    kw = {"root": root, "p": p}
    while len(cut) and undecided > COLLECT_MAX and fixed < 64:
        hist = np.zeros((len(cut), 1 << DIGIT), dtype=np.int64)

        def take(_: int, h: np.ndarray) -> None:
            hist[:] += h

        map_tasks(histogram_task, shards, kwargs={**kw, "active": cut, "prefix": prefix, "fixed": fixed},
                  desc="sample cut", memory=memory, on_result=take)
        fixed += DIGIT
        cum = np.cumsum(hist, axis=1)
        digit = np.argmax(cum >= need[:, None], axis=1)
        rows = np.arange(len(cut))
        need = need - np.where(digit > 0, cum[rows, np.maximum(digit - 1, 0)], 0)
        prefix = prefix | (digit.astype(np.uint64) << np.uint64(64 - fixed))
        in_bucket = hist[rows, digit]
        whole = in_bucket == need  # the whole bucket is taken: the cut is its last value
        limit[cut[whole]] = prefix[whole] | np.uint64((1 << (64 - fixed)) - 1)
        cut, need, prefix, in_bucket = cut[~whole], need[~whole], prefix[~whole], in_bucket[~whole]
        undecided = int(in_bucket.sum())
    if len(cut):
        got: list[tuple] = []
        map_tasks(collect_task, shards, kwargs={**kw, "active": cut, "prefix": prefix, "fixed": fixed},
                  desc="sample cut", memory=memory, on_result=lambda _, r: got.append(r))
        c = np.concatenate([g[0] for g in got])
        pr = np.concatenate([g[1] for g in got])
        ks = np.array([k for g in got for k in g[2]], dtype=object)
        order = np.lexsort((ks, pr, c))
        c, pr, ks = c[order], pr[order], ks[order]
        start = np.searchsorted(c, cut)
        for j, cl in enumerate(cut):
            i = start[j] + need[j] - 1
            limit[cl], last_key[int(cl)] = pr[i], str(ks[i])
    return limit, last_key


def write_task(shard: int, *, root: str, p: dict, share: np.ndarray, limit: np.ndarray, last_key: dict) -> dict:
    """Write one shard's sample part: selected = priority at or below its cluster's cut (ties by key)."""
    import pyarrow as pa

    keys, level1, ok, prio = candidates(root, shard, p)
    c = np.maximum(level1, 0)
    sel = ok & (level1 >= 0) & (share[c] > 0) & (prio <= limit[c])
    for i in np.flatnonzero(sel & (prio == limit[c])):
        cut_key = last_key.get(int(level1[i]))
        if cut_key is not None and keys[i] > cut_key:
            sel[i] = False
    Dataset(root).write_sidecar(STAGE, shard, pa.table({"key": pa.array(keys, pa.string()),
                                                        "selected": pa.array(sel, pa.bool_())}))
    return {"counts": {"total": len(keys), "selected": int(sel.sum())}}


def run_sample(input: str, target: int | None = None, *, summary: bool = True,
               resources: TaskResources | dict | None = None, **options: Any) -> StageResult:
    """Select ``target`` keys balanced over the clusters and write the ``sample`` sidecar.

    ``options`` are ``SampleParams`` fields. ``info``: selected, clustered,
    target, entropy_before / entropy_after (nats, of level-1 cluster sizes over
    the candidates and over the selection).
    """
    from webcurate.shards.global_stage import GlobalStage, require_complete, stage_run
    from webcurate.shards.params import parse

    if target is not None:
        options["target"] = target
    params = parse(SampleParams, options, "sample")
    res = resources if isinstance(resources, TaskResources) else parse(TaskResources, resources or {}, "resources")
    ds = Dataset(input)
    shards = require_complete(ds, CLUSTERS, "cluster")
    from .quality_params import score_stage

    scores = [*params.floors(), *([params.weight_by] if params.weight_by else [])]
    for name in scores:
        require_complete(ds, score_stage(name), "score")
    upstream = {CLUSTERS: stage_run(ds.root, CLUSTERS), **{score_stage(n): stage_run(ds.root, score_stage(n))
                                                           for n in scores}}
    stage = GlobalStage(ds, STAGE, {**params.record(), "upstream": upstream}, command="sample")
    if stage.is_complete():
        result = stage.skipped()
        if summary:
            print(f"sample of {ds.root} is complete with these parameters; nothing to do")
        return result
    stage.start()
    k1 = load_centroids(ds.root, 1).shape[0]
    levels = len(level_columns(ds.read_sidecar_part(CLUSTERS, shards[0]).schema))
    parents = [load_parents(ds.root, t) for t in range(1, levels)]
    p = {"floors": params.floors(), "weight_by": params.weight_by, "strategy": params.strategy, "seed": params.seed}
    counts = np.zeros(k1, dtype=np.int64)

    def add(_: int, c: np.ndarray) -> None:
        counts[:] += c

    map_tasks(counts_task, shards, kwargs={"root": ds.root, "p": p, "k1": k1}, desc="sample counts",
              memory=res.task_memory(), on_result=add)
    n_ok = int(counts.sum())
    if n_ok == 0:
        raise DatasetError(f"{ds.root} has no clustered samples to select from")
    warns = []
    if params.target > n_ok:
        warns.append(f"target {params.target} is larger than the {n_ok} clustered samples; selecting all of them")
    share = shares_from_level1_counts(counts, parents, min(params.target, n_ok), params.seed)
    limit, last_key = thresholds(ds.root, shards, p, share, counts, res.task_memory())
    result = stage.write_parts(write_task, memory=res.task_memory(),
                               kwargs={"p": p, "share": share, "limit": limit, "last_key": last_key})
    top = counts
    for par in parents:
        top = np.bincount(par, weights=top, minlength=int(par.max()) + 1 if len(par) else 0)
    top_share = share
    for par in parents:
        top_share = np.bincount(par, weights=top_share, minlength=int(par.max()) + 1 if len(par) else 0)
    info = {"selected": int(share.sum()), "clustered": n_ok, "target": params.target,
            "entropy_before": _entropy(counts), "entropy_after": _entropy(share),
            "top_entropy_before": _entropy(top), "top_entropy_after": _entropy(top_share),
            "clusters_represented": int((share > 0).sum())}
    result = stage.finish(result, summary=False, warnings=warns, **info)
    result.warnings = warns
    for w in warns:
        warnings.warn(w, stacklevel=2)
        print(f"warning: {w}")
    if summary:
        _print(result, ds.root, params.strategy)
    return result


def _entropy(counts: np.ndarray) -> float:
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    return float(-(c / c.sum() * np.log(c / c.sum())).sum()) if len(c) else 0.0


def _print(result: StageResult, root: str, strategy: str) -> None:
    from webcurate.shards.progress import print_table

    i = result.info
    rows = [("clustered samples", i["clustered"]), ("target", i["target"]), ("selected", i["selected"]),
            ("level-1 clusters represented", i["clusters_represented"]),
            ("level-1 size entropy before -> after", f"{i['entropy_before']:.3f} -> {i['entropy_after']:.3f}"),
            ("top level size entropy before -> after",
             f"{i['top_entropy_before']:.3f} -> {i['top_entropy_after']:.3f}"),
            ("seconds", f"{result.seconds:.1f}")]
    print_table(f"sample ({strategy}): {root}", rows, ("what", "value"))


def selected_keys(ds: Dataset) -> list[str]:
    """Keys the ``sample`` sidecar selected."""
    t = ds.read_sidecar(STAGE, columns=["key", "selected"])
    return [k for k, s in zip(t["key"].to_pylist(), t["selected"].to_pylist()) if s]


__all__ = ["run_sample", "selected_keys", "priorities", "size_entropy"]
