"""``webcurate dedup``: which samples to keep, written as the ``dedup`` sidecar.

Methods (the decision is global, the output per shard):

- ``exact``: samples with the same sha256 (from the index); one kept per group.
- ``copy`` (DINOv2 recipe): exact first, then a faiss kNN graph over the
  embeddings (``k`` neighbours, edges with cosine > ``threshold``), connected
  components with union-find, one sample kept per component.
- ``semdedup`` (Abbas et al. 2023): exact first, then spherical k-means; inside
  each cluster, samples in keep-policy order are dropped when their max cosine
  to an already kept sample is >= 1 - ``eps``.
- ``none``: no self-dedup (only ``against``).
- ``against`` (relative dedup, DINOv2 uses 0.45): pool samples whose cosine to
  any sample of another dataset is > ``against_threshold`` are dropped
  together with their whole component of the pool's kNN graph.

Keep policy: ``largest`` keeps the sample with most pixels (ties: more bytes,
then the smaller key), ``first`` keeps the smallest key.

Part columns: key, keep (bool), duplicate_of (string|null: the kept sample,
or the matched key of the ``against`` dataset), similarity (float|null),
reason (exact|copy|semdedup|against|no_embedding|null), against_dataset
(string|null). ``duplicate_of`` always names a kept sample for self-dedup.
Samples whose embedding failed are not kept (``no_embedding``) by the
embedding-based methods.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from webcurate.shards.errors import ConfigError

from . import vectors
from .unionfind import connected_components

STAGE = "dedup"
METHODS = ("exact", "copy", "semdedup", "none")
KEEP_POLICIES = ("largest", "first")
REASONS = ("exact", "copy", "semdedup", "against", "no_embedding")


# --------------------------------------------------------------------------
# Core algorithms on arrays (no I/O): used by run_dedup and the benchmarks.
# --------------------------------------------------------------------------
def keep_rank(keys: list[str], pixels: np.ndarray | None, nbytes: np.ndarray | None, policy: str) -> np.ndarray:
    """Preference rank of each sample, 0 = kept first: (N,) int64.

    ``largest``: most pixels, then most bytes (the better-quality re-encode),
    then smallest key. ``first``: smallest key.
    """
    if policy not in KEEP_POLICIES:
        raise ConfigError(f"--keep must be one of {', '.join(KEEP_POLICIES)}, got {policy!r}")
    key_order = np.argsort(np.array(keys, dtype=object), kind="stable")
    key_rank = np.empty(len(keys), dtype=np.int64)
    key_rank[key_order] = np.arange(len(keys))
    if policy == "first":
        return key_rank
    px = np.nan_to_num(np.asarray(pixels if pixels is not None else np.zeros(len(keys)), dtype=np.float64))
    nb = np.nan_to_num(np.asarray(nbytes if nbytes is not None else np.zeros(len(keys)), dtype=np.float64))
    order = np.lexsort((key_rank, -nb, -px))
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys))
    return rank


def exact_duplicates(sha: list[str | None], rank: np.ndarray) -> np.ndarray:
    """For each sample, the index of the kept sample with the same sha256, -1 if it is kept.

    Samples with no sha256 are never grouped.
    """
    n = len(sha)
    out = np.full(n, -1, dtype=np.int64)
    best: dict[str, int] = {}
    for i in np.argsort(rank, kind="stable"):
        h = sha[i]
        if not h:
            continue
        if h in best:
            out[i] = best[h]
        else:
            best[h] = int(i)
    return out


def keepers_of_components(labels: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """The index of the best-ranked member of each sample's component: (N,) int64."""
    n = len(labels)
    rank = np.argsort(np.argsort(rank, kind="stable"), kind="stable")  # dense 0..n-1 (rank may be a subset's)
    best_rank = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(best_rank, labels, rank)
    by_rank = np.empty(n, dtype=np.int64)
    by_rank[rank] = np.arange(n)
    return by_rank[best_rank[labels]]


@dataclass
class CopyResult:
    """dup_of: (N,) int64 kept sample of each dropped one, -1 when kept;
    similarity: (N,) float32 cosine to it (NaN when kept); labels: (N,)
    component label; edges: number of edges above the threshold."""

    dup_of: np.ndarray
    similarity: np.ndarray
    labels: np.ndarray
    edges: int
    index_kind: str
    src: np.ndarray
    dst: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


def copy_dedup(x: np.ndarray, rank: np.ndarray, *, k: int = 64, threshold: float = 0.6,
               index_kind: str = "auto", nprobe: int | None = None, seed: int = 0) -> CopyResult:
    """DINOv2 copy dedup of ``x`` (N, D) normalised: kNN graph, union-find, keep one per component."""
    n = x.shape[0]
    choice = vectors.choose_index(n, kind=index_kind, nprobe=nprobe)
    if n < 2:
        return CopyResult(np.full(n, -1, np.int64), np.full(n, np.nan, np.float32), np.arange(n),
                          0, choice.kind, np.zeros(0, np.int64), np.zeros(0, np.int64))
    k = vectors.clamp_k(k, n - 1, "k")
    timings: dict[str, float] = {}
    src, dst, _ = vectors.knn_edges(x, k, threshold, choice=choice, seed=seed, timings=timings)
    t = time.time()
    labels = connected_components(n, src, dst)
    keeper = keepers_of_components(labels, rank)
    timings["components"] = time.time() - t
    dropped = np.flatnonzero(keeper != np.arange(n))
    dup_of = np.full(n, -1, dtype=np.int64)
    dup_of[dropped] = keeper[dropped]
    sim = np.full(n, np.nan, dtype=np.float32)
    sim[dropped] = vectors.pairwise_dot(x, dropped, keeper[dropped])
    return CopyResult(dup_of, sim, labels, int(len(src)), choice.kind, src, dst,
                      {k_: round(v, 3) for k_, v in timings.items()})


def semdedup(x: np.ndarray, rank: np.ndarray, *, eps: float = 0.07, n_clusters: int | None = None,
             seed: int = 0, block: int = 1024) -> tuple[np.ndarray, np.ndarray, int]:
    """SemDeDup of ``x`` (N, D) normalised.

    Returns ``(dup_of, similarity, n_clusters)``: dup_of (N,) int64 the kept
    sample each dropped one is closest to (-1 when kept), similarity (N,)
    float32. Inside a cluster samples are visited in ``rank`` order; one is
    dropped when its max cosine to the already kept ones is >= 1 - eps.
    Memory per step is (block x cluster size), never cluster size squared.
    """
    import faiss

    from webcurate.shards.progress import progress_bar

    if not 0 < eps < 1:
        raise ConfigError(f"--eps must lie in (0, 1), got {eps}")
    n, d = x.shape
    dup_of = np.full(n, -1, dtype=np.int64)
    sim = np.full(n, np.nan, dtype=np.float32)
    if n < 2:
        return dup_of, sim, n
    kc = n_clusters or max(1, int(np.ceil(n / 1000)))
    _, assign = vectors.kmeans(x, kc, seed=seed)
    kc = int(assign.max()) + 1
    thr = np.float32(1.0 - eps)
    order = np.lexsort((rank, assign))  # by cluster, then preference
    bounds = np.flatnonzero(np.diff(assign[order])) + 1
    groups = np.split(order, bounds)
    bar = progress_bar(total=n, desc="semdedup", unit="item") if n > 50_000 else None
    for members in groups:
        kept_index = faiss.IndexFlatIP(d)
        kept_ids: list[np.ndarray] = []
        for start in range(0, len(members), block):
            ids = members[start:start + block]
            xb = np.ascontiguousarray(x[ids])
            b = len(ids)
            best = np.full(b, -np.inf, dtype=np.float32)
            arg = np.full(b, -1, dtype=np.int64)
            if kept_index.ntotal:
                s, i = kept_index.search(xb, 1)
                best, arg = s[:, 0].copy(), np.concatenate(kept_ids)[i[:, 0]]
            gram = xb @ xb.T
            keep = np.zeros(b, dtype=bool)
            for t in range(b):  # sequential by definition: each decision depends on earlier keeps
                if best[t] >= thr:
                    continue
                keep[t] = True
                row = gram[t, t + 1:]
                better = row > best[t + 1:]
                best[t + 1:][better] = row[better]
                arg[t + 1:][better] = ids[t]
            drop = ~keep
            dup_of[ids[drop]] = arg[drop]
            sim[ids[drop]] = best[drop]
            if keep.any():
                kept_index.add(xb[keep])
                kept_ids.append(ids[keep])
        if bar is not None:
            bar.update(len(members))
    if bar is not None:
        bar.close()
    return dup_of, sim, kc


def nearest_in(pool: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best cosine of each pool row to ``other`` and its index: (N,) float32, (N,) int64."""
    index = vectors.build_index(other)
    s, i = vectors.search(index, pool, 1, desc="against")
    return s[:, 0], i[:, 0]


# --------------------------------------------------------------------------
# The stage.
# --------------------------------------------------------------------------
def run_dedup(
    input: str,
    *,
    method: str = "copy",
    k: int = 64,
    threshold: float = 0.6,
    against: list[str] | None = None,
    against_threshold: float = 0.45,
    eps: float = 0.07,
    keep: str = "largest",
    n_clusters: int | None = None,
    index: str = "auto",
    nprobe: int | None = None,
    seed: int = 0,
    summary: bool = True,
) -> dict[str, Any]:
    """Deduplicate dataset ``input`` and write its ``dedup`` sidecar.

    See the module docstring for methods and columns. ``index`` forces the
    kNN index (auto|flat|ivf) and ``nprobe`` sets how many IVF cells each
    sample searches (default 10: more finds more, slower); ``n_clusters`` sets SemDeDup's k-means size
    (default N/1000). Returns counts (total, kept, removed, per reason),
    components, edges and seconds. Re-running with the same parameters on
    the same embeddings does nothing; parts missing after a killed run are
    recomputed and written.
    """
    from webcurate.shards.progress import print_table
    from webcurate.shards import manifest as manifest_mod
    from webcurate.shards.dataset import Dataset

    t0 = time.time()
    against = list(against or [])
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "none" and not against:
        raise ConfigError("--method none only makes sense with --against DATASET")
    if not -1.0 <= threshold <= 1.0 or not -1.0 <= against_threshold <= 1.0:
        raise ConfigError("--threshold and --against-threshold are cosines and must lie in [-1, 1]")
    if keep not in KEEP_POLICIES:
        raise ConfigError(f"--keep must be one of {', '.join(KEEP_POLICIES)}, got {keep!r}")
    ds = Dataset(input)
    shards = ds.completed_shards()
    if not shards:
        raise vectors.EmbeddingError(f"{input} has no completed shards to deduplicate")
    idx = ds.index(status="ok")
    keys: list[str] = idx["key"].to_pylist()
    n = len(keys)
    shard_of = np.asarray(idx["shard"].to_numpy(zero_copy_only=False), dtype=np.int64)
    col = lambda name: (idx[name].to_numpy(zero_copy_only=False) if name in idx.column_names else None)  # noqa: E731
    w, h = col("width"), col("height")
    pixels = (np.nan_to_num(w.astype(np.float64)) * np.nan_to_num(h.astype(np.float64))) if w is not None and h is not None else None
    rank = keep_rank(keys, pixels, col("bytes"), keep)
    sha = idx["sha256"].to_pylist() if "sha256" in idx.column_names else [None] * n

    need_emb = method in ("copy", "semdedup") or bool(against)
    emb = vectors.read_embeddings(input, what="dataset") if need_emb else None
    timings: dict[str, float] = {"load": round(time.time() - t0, 3)}
    parameters: dict[str, Any] = {
        "method": method, "keep": keep, "samples": n,
        **({"k": k, "threshold": threshold, "index": index, "nprobe": nprobe} if method == "copy" or against else {}),
        **({"eps": eps, "n_clusters": n_clusters} if method == "semdedup" else {}),
        **({"against": against, "against_threshold": against_threshold} if against else {}),
        **({"embeddings": emb.fingerprint()} if emb is not None else {}),
    }
    manifest_mod.record_stage(ds.root, STAGE, parameters)
    ds.reload()
    done = set(ds.sidecar_completed(STAGE))
    todo = [s for s in shards if s not in done]
    if not todo:
        entry = ds.manifest["stages"][STAGE]
        result = {"stage": STAGE, "root": ds.root, "method": method, "counts": entry.get("counts", {}),
                  "shards_written": [], "shards_skipped": sorted(done), "seconds": round(time.time() - t0, 3),
                  "note": "already complete with these parameters"}
        if summary:
            _print(result, print_table)
        return result

    keep_mask = np.ones(n, dtype=bool)
    dup_of = np.full(n, -1, dtype=np.int64)     # index into keys (self-dedup)
    similarity = np.full(n, np.nan, dtype=np.float32)
    reason = np.full(n, None, dtype=object)
    against_key = np.full(n, None, dtype=object)
    against_ds = np.full(n, None, dtype=object)
    info: dict[str, Any] = {}

    # 1. exact (also the cheap first pass of copy / semdedup).
    if method in ("exact", "copy", "semdedup"):
        ex = exact_duplicates(sha, rank)
        hit = ex >= 0
        keep_mask[hit], dup_of[hit], similarity[hit], reason[hit] = False, ex[hit], 1.0, "exact"
        info["exact_removed"] = int(hit.sum())

    # Positions of embedded samples in ``keys``.
    if emb is not None:
        pos_of = {key: i for i, key in enumerate(keys)}
        emb_pos = np.array([pos_of.get(key, -1) for key in emb.keys], dtype=np.int64)
        if (emb_pos < 0).any():
            # Embeddings of samples that are no longer ok in the index: ignore them.
            sel = emb_pos >= 0
            emb_vec, emb_pos = emb.vectors[sel], emb_pos[sel]
        else:
            emb_vec = emb.vectors
        has_emb = np.zeros(n, dtype=bool)
        has_emb[emb_pos] = True
        if method in ("copy", "semdedup"):
            missing = ~has_emb & keep_mask
            keep_mask[missing], reason[missing] = False, "no_embedding"
            info["no_embedding"] = int(missing.sum())

    # 2. copy / semdedup among embedded samples that survived exact.
    graph: tuple[np.ndarray, np.ndarray] | None = None  # pool graph in emb_pos numbering, for `against`
    if method in ("copy", "semdedup"):
        live = keep_mask[emb_pos]
        sub_pos = emb_pos[live]
        xs = emb_vec if live.all() else np.ascontiguousarray(emb_vec[live])  # no copy when all are still in
        sub_rank = rank[sub_pos]
        if method == "copy":
            cr = copy_dedup(xs, sub_rank, k=k, threshold=threshold, index_kind=index, nprobe=nprobe, seed=seed)
            d_sub, s_sub = cr.dup_of, cr.similarity
            info.update(edges=cr.edges, components=int(len(np.unique(cr.labels))), index=cr.index_kind)
            timings.update(cr.timings)
            live_idx = np.flatnonzero(live)
            graph = (live_idx[cr.src], live_idx[cr.dst])
        else:
            t = time.time()
            d_sub, s_sub, kc = semdedup(xs, sub_rank, eps=eps, n_clusters=n_clusters, seed=seed)
            info["clusters"] = kc
            timings["semdedup"] = round(time.time() - t, 3)
        dropped = np.flatnonzero(d_sub >= 0)
        tgt = sub_pos[dropped]
        keep_mask[tgt], dup_of[tgt], similarity[tgt], reason[tgt] = False, sub_pos[d_sub[dropped]], s_sub[dropped], method
        # Exact duplicates of a sample that was itself dropped point at its survivor.
        chained = np.flatnonzero((dup_of >= 0) & (reason == "exact"))
        nxt = dup_of[chained]
        moved = dup_of[nxt] >= 0
        dup_of[chained[moved]] = dup_of[nxt[moved]]
        similarity[chained[moved]] = similarity[nxt[moved]]

    # 3. against other datasets: whole components of the pool graph.
    if against:
        assert emb is not None
        t_against = time.time()
        best = np.full(len(emb_pos), -np.inf, dtype=np.float32)
        best_key = np.full(len(emb_pos), None, dtype=object)
        best_ds = np.full(len(emb_pos), None, dtype=object)
        for other_root in against:
            other = vectors.read_embeddings(other_root, what="--against dataset")
            vectors.check_compatible(emb, other)
            if other.n == 0:
                warnings.warn(f"--against dataset {other_root} has no embeddings to compare with", stacklevel=2)
                continue
            s, i = nearest_in(np.ascontiguousarray(emb_vec), other.vectors)
            better = s > best
            best[better] = s[better]
            okeys = np.array(other.keys, dtype=object)
            best_key[better] = okeys[i[better]]
            best_ds[better] = other_root
        hit = best > against_threshold
        if graph is None:
            # Components need the pool's own near-duplicate graph; exact pairs join it too.
            src, dst, _ = vectors.knn_edges(np.ascontiguousarray(emb_vec), k, threshold,
                                            choice=vectors.choose_index(len(emb_vec), kind=index, nprobe=nprobe))
            graph = (src, dst)
        src, dst = graph
        # Exact duplicates share a component with the sample they duplicate.
        e_pos = np.flatnonzero(reason[emb_pos] == "exact")
        emb_index = np.full(n, -1, dtype=np.int64)
        emb_index[emb_pos] = np.arange(len(emb_pos))
        e_tgt = emb_index[dup_of[emb_pos[e_pos]]]
        ok = e_tgt >= 0
        src = np.concatenate([src, e_pos[ok]])
        dst = np.concatenate([dst, e_tgt[ok]])
        labels = connected_components(len(emb_pos), src, dst)
        hit_comp = np.zeros(len(emb_pos), dtype=bool)
        hit_comp[labels[hit]] = True
        drop = hit_comp[labels]
        # The component's strongest hit names what it matched.
        comp_best = np.full(len(emb_pos), -np.inf, dtype=np.float32)
        np.maximum.at(comp_best, labels[hit], best[hit])
        strongest = np.flatnonzero(hit & (best == comp_best[labels]))
        rep = np.full(len(emb_pos), -1, dtype=np.int64)
        rep[labels[strongest]] = strongest
        dropped = np.flatnonzero(drop)
        via = np.where(hit[dropped], dropped, rep[labels[dropped]])
        tgt = emb_pos[dropped]
        keep_mask[tgt], reason[tgt] = False, "against"
        dup_of[tgt] = -1
        against_key[tgt], against_ds[tgt] = best_key[via], best_ds[via]
        similarity[tgt] = best[dropped]
        info["against_hits"] = int(hit.sum())
        info["against_removed"] = int(drop.sum())
        timings["against"] = round(time.time() - t_against, 3)

    # 4. write per-shard parts (only those still missing).
    key_arr = np.array(keys, dtype=object)
    dup_key = np.where(dup_of >= 0, key_arr[np.maximum(dup_of, 0)], against_key)
    order = np.argsort(shard_of, kind="stable")
    shard_sorted = shard_of[order]
    starts = np.searchsorted(shard_sorted, todo, side="left")
    ends = np.searchsorted(shard_sorted, todo, side="right")
    import pyarrow as pa

    def part(rows: np.ndarray) -> pa.Table:
        sims = similarity[rows]
        return pa.table({
            "key": pa.array(key_arr[rows].tolist(), pa.string()),
            "keep": pa.array(keep_mask[rows], pa.bool_()),
            "duplicate_of": pa.array(dup_key[rows].tolist(), pa.string()),
            "similarity": pa.array(sims, pa.float32(), mask=np.isnan(sims)),
            "reason": pa.array(reason[rows].tolist(), pa.string()),
            "against_dataset": pa.array(against_ds[rows].tolist(), pa.string()),
        })

    def stats(rows: np.ndarray) -> dict[str, Any]:
        counts = {"total": int(len(rows)), "kept": int(keep_mask[rows].sum()), "removed": int((~keep_mask[rows]).sum())}
        for r in REASONS:
            c = int(np.sum(reason[rows] == r))
            if c:
                counts[f"removed:{r}"] = c
        return {"counts": counts}

    t = time.time()
    vectors.write_sidecar_parts(ds, STAGE, todo, [order[a:b] for a, b in zip(starts, ends)], part, stats)
    timings["write"] = round(time.time() - t, 3)
    manifest_mod.record_stage(ds.root, STAGE, parameters, finished=manifest_mod.now_iso(), **info)
    ds.reload()
    counts = {"total": n, "kept": int(keep_mask.sum()), "removed": int((~keep_mask).sum())}
    for r in REASONS:
        c = int(np.sum(reason == r))
        if c:
            counts[f"removed:{r}"] = c
    result = {"stage": STAGE, "root": ds.root, "method": method, "counts": counts, **info,
              "shards_written": todo, "shards_skipped": sorted(done), "seconds": round(time.time() - t0, 3),
              "timings": timings}
    if summary:
        _print(result, print_table)
    return result


def _print(result: dict[str, Any], print_table) -> None:
    rows = [(k, v) for k, v in result["counts"].items()]
    for k in ("exact_removed", "no_embedding", "edges", "components", "index", "clusters",
              "against_hits", "against_removed"):
        if k in result:
            rows.append((k, result[k]))
    rows.append(("shards written / skipped", f"{len(result['shards_written'])} / {len(result['shards_skipped'])}"))
    rows.append(("seconds", f"{result['seconds']:.1f}"))
    if result.get("note"):
        rows.append(("note", result["note"]))
    print_table(f"dedup ({result['method']}): {result['root']}", rows, ("what", "count"))
