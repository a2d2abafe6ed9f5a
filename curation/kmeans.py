"""Hierarchical k-means with resampling (Vo et al. 2024) on faiss.

Level 1 clusters the points, level t clusters level t-1's centroids, and each
level can run *resampling steps*: take the ``sample_size`` points closest to
each centroid (or random ones), re-run k-means on that balanced sample, and
re-assign every input of the level to the new centroids. Resampling pulls
centroids away from dense regions, so clusters spread evenly over concepts
instead of crowding where the data is dense.

Level 1 is where the cost is (N points x k centroids x D). For small problems
it is one faiss k-means. For large ones (``method="split"``, chosen
automatically above ``SPLIT_WORK``) it is the two-stage scheme the reference
uses at scale: a coarse k-means with ~sqrt(k) cells, each cell split into a
number of centroids proportional to its size, then a few global Lloyd
iterations over all points whose nearest-centroid search goes through an IVF
index over the centroids, so no step ever compares all N points to all k
centroids more than once.

Everything is deterministic given ``seed``: faiss k-means seeds its own
initialisation and subsampling, our own sampling uses numpy generators
derived from the seed, and faiss searches are exact or deterministic IVF.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from webcurate.shards.errors import ConfigError

# faiss parallelises with OpenMP, whose threads spin while waiting by default.
# On a machine shared with other busy processes (Ray workers, other jobs) the
# spinning threads starve each other: measured 10x slower k-means on a loaded
# 2-core box. Passive waiting costs little when the machine is idle. Only
# effective if faiss was not loaded yet; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Above this many point-centroid distance evaluations per Lloyd iteration
# (N * k), level 1 switches from flat k-means to coarse-then-split.
SPLIT_WORK = 2e9
# Points per faiss search call and per block of the centroid sums: bounds the
# result arrays and the float64 temporary of ``centroid_means`` (~200 MB at D=384).
SEARCH_CHUNK = 65536
# k-means++ initialisation (what the reference uses; it seeds centroids in
# sparse regions too, which is what lets resampling balance clusters) costs k
# sequential passes over the training points (~40 s for 50k x 1000 x 384 on 2
# cores); above this many point-centroid pairs we use AFK-MC2, faiss's cheap
# MCMC approximation of it.
KPP_WORK = 2e7
# Level-1 resampling re-runs k-means and re-assigns every point per step;
# with an int ``resampling_steps`` it is done only below this N * k.
LEVEL1_RESAMPLE_WORK = 5e7
_INIT_METHODS = {
    "kmeans++": lambda: __import__("faiss").ClusteringInitMethod_KMEANS_PLUS_PLUS,
    "afkmc2": lambda: __import__("faiss").ClusteringInitMethod_AFK_MC2,
}


class KMeansError(ConfigError):
    """Inputs k-means cannot work with (empty, NaN, wrong shape)."""


@dataclass
class KMeansResult:
    """One flat clustering.

    centroids: (k, D) float32; assignment: (N,) int64 cluster of each input;
    distance: (N,) float32 L2 distance of each input to its centroid.
    """

    centroids: np.ndarray
    assignment: np.ndarray
    distance: np.ndarray

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])


@dataclass
class Level:
    """One level of the hierarchy: what it clustered and the result.

    ``requested_k`` is what was asked; ``centroids.shape[0]`` what was used
    (clamped to the number of inputs). ``assignment`` maps each input of the
    level (points for level 1, level t-1 centroids above) to a cluster.
    """

    requested_k: int
    centroids: np.ndarray
    assignment: np.ndarray
    distance: np.ndarray
    resampling_steps: int = 0
    sample_size: int = 0
    method: str = "flat"

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])


@dataclass
class Hierarchy:
    """The result of hierarchical k-means over N points.

    ``labels()`` gives (N, L) int32 cluster ids per level; ``distance`` is
    (N,) float32, each point's L2 distance to its level-1 centroid.
    """

    levels: list[Level] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_points(self) -> int:
        return int(self.levels[0].assignment.shape[0]) if self.levels else 0

    @property
    def distance(self) -> np.ndarray:
        return self.levels[0].distance

    def labels(self) -> np.ndarray:
        """(N, L) int32: column t-1 holds each point's cluster id at level t."""
        out = np.empty((self.num_points, len(self.levels)), dtype=np.int32)
        cur = self.levels[0].assignment
        out[:, 0] = cur
        for t, level in enumerate(self.levels[1:], start=1):
            cur = level.assignment[cur]
            out[:, t] = cur
        return out

    def parents(self, t: int) -> np.ndarray:
        """(k_t,) int32: the level-(t+1) cluster of each level-t centroid (t is 1-based, t < L)."""
        return self.levels[t].assignment.astype(np.int32)


# -- flat k-means ---------------------------------------------------------------

def _as_points(X: np.ndarray, what: str = "embeddings") -> np.ndarray:
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise KMeansError(f"{what} must be a non-empty (N, D) array, got shape {X.shape}")
    if not np.isfinite(X).all():
        bad = int((~np.isfinite(X).all(axis=1)).sum())
        raise KMeansError(f"{what} hold {bad} row(s) with NaN or infinite values")
    return X


def clamp_k(k: int, n: int, what: str = "k") -> tuple[int, str | None]:
    """``min(k, n)`` and a warning text when it had to clamp."""
    if k < 1:
        raise KMeansError(f"{what} must be >= 1, got {k}")
    if k > n:
        return n, f"{what}={k} is larger than the {n} inputs to cluster; using {what}={n}"
    return k, None


def _faiss_kmeans(X: np.ndarray, k: int, *, niter: int, seed: int, max_points_per_centroid: int,
                  init_centroids: np.ndarray | None = None, init: str | None = None) -> np.ndarray:
    """faiss k-means centroids (k, D) float32 for X (N, D) float32, N >= k."""
    import faiss

    if init is None or init == "auto":
        n_train = min(X.shape[0], k * max_points_per_centroid)
        init = "kmeans++" if n_train * k <= KPP_WORK else "afkmc2"
    extra = {}
    if init_centroids is None and init != "random":
        extra["init_method"] = _INIT_METHODS[init]()
    km = faiss.Kmeans(
        X.shape[1], k, niter=niter, seed=int(seed) & 0x7FFFFFFF, verbose=False,
        max_points_per_centroid=max_points_per_centroid,
        # Upper levels cluster few inputs per centroid by design; faiss's
        # "please provide at least 39 points per centroid" warning is noise there.
        min_points_per_centroid=1,
        **extra,
    )
    km.train(X, init_centroids=init_centroids)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def assign(X: np.ndarray, centroids: np.ndarray, *, approximate: bool | None = None,
           nprobe: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each point.

    X: (N, D) float32, centroids: (k, D) float32 -> (assignment (N,) int64,
    distance (N,) float32 L2). Exact search by default; ``approximate``
    (default: when N * k > SPLIT_WORK) searches an IVF index over the
    centroids with ``nprobe`` cells, which finds the nearest centroid for
    nearly every point at a fraction of the cost.
    """
    import faiss

    X = np.ascontiguousarray(X, dtype=np.float32)
    C = np.ascontiguousarray(centroids, dtype=np.float32)
    n, d = X.shape
    k = C.shape[0]
    if approximate is None:
        approximate = n * k > SPLIT_WORK and k >= 1024
    if approximate:
        nlist = max(1, int(round(math.sqrt(k))))
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist)
        index.cp.seed = int(seed) & 0x7FFFFFFF
        index.cp.min_points_per_centroid = 1
        index.train(C)
        index.add(C)
        index.nprobe = min(nprobe, nlist)
    else:
        index = faiss.IndexFlatL2(d)
        index.add(C)
    labels = np.empty(n, dtype=np.int64)
    dist = np.empty(n, dtype=np.float32)
    for s in range(0, n, SEARCH_CHUNK):
        D_, I_ = index.search(X[s:s + SEARCH_CHUNK], 1)
        labels[s:s + SEARCH_CHUNK] = I_[:, 0]
        dist[s:s + SEARCH_CHUNK] = D_[:, 0]
    missing = labels < 0
    if missing.any():  # IVF found nothing in the probed cells: search exactly
        li, di = assign(X[missing], C, approximate=False)
        labels[missing], dist[missing] = li, di
        return labels, dist
    return labels, np.sqrt(np.maximum(dist, 0.0))


def centroid_means(X: np.ndarray, assignment: np.ndarray, k: int,
                   previous: np.ndarray | None = None) -> np.ndarray:
    """Mean of the points of each cluster: (k, D) float32.

    Clusters with no points keep their ``previous`` centroid. Sums are in
    float64, chunk by chunk, so memory stays at one chunk beyond X.
    """
    d = X.shape[1]
    sums = np.zeros((k, d), dtype=np.float64)
    counts = np.bincount(assignment, minlength=k)
    for s in range(0, X.shape[0], SEARCH_CHUNK):
        a = assignment[s:s + SEARCH_CHUNK]
        order = np.argsort(a, kind="stable")
        a_sorted = a[order]
        starts = np.flatnonzero(np.r_[True, a_sorted[1:] != a_sorted[:-1]])
        block = np.add.reduceat(X[s:s + SEARCH_CHUNK][order].astype(np.float64), starts, axis=0)
        sums[a_sorted[starts]] += block
    out = np.zeros((k, d), dtype=np.float32)
    nz = counts > 0
    out[nz] = (sums[nz] / counts[nz, None]).astype(np.float32)
    if previous is not None:
        out[~nz] = previous[~nz]
    return out


def kmeans(X: np.ndarray, k: int, *, niter: int = 20, seed: int = 0,
           max_points_per_centroid: int = 256, init_centroids: np.ndarray | None = None) -> KMeansResult:
    """Flat L2 k-means with faiss, then an exact assignment of every point.

    X: (N, D) float32 with N >= k. faiss trains on at most
    ``k * max_points_per_centroid`` points (a seeded subsample).
    """
    X = _as_points(X)
    if k > X.shape[0]:
        raise KMeansError(f"k={k} is larger than the {X.shape[0]} points; clamp it first (clamp_k)")
    C = _faiss_kmeans(X, k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid,
                      init_centroids=init_centroids)
    a, dist = assign(X, C, approximate=False)
    return KMeansResult(C, a, dist)


def _proportional_split(sizes: np.ndarray, k: int) -> np.ndarray:
    """Integers k_c with sum k, 1 <= k_c <= sizes_c, proportional to sizes (largest remainder)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    n = int(sizes.sum())
    k = min(k, n)
    share = sizes * (k / n)
    out = np.clip(np.floor(share).astype(np.int64), 1, sizes)
    # Hand out the rest (or take back the excess) one by one by remainder.
    rest = share - np.floor(share)
    while out.sum() < k:
        room = out < sizes
        order = np.lexsort((np.arange(len(sizes)), -np.where(room, rest, -np.inf)))
        take = order[: min(int(k - out.sum()), int(room.sum()))]
        out[take] += 1
        rest[take] = -1.0
    while out.sum() > k:
        can = out > 1
        order = np.lexsort((np.arange(len(sizes)), np.where(can, rest, np.inf)))
        give = order[: min(int(out.sum() - k), int(can.sum()))]
        out[give] -= 1
        rest[give] = np.inf
    return out


def split_kmeans(X: np.ndarray, k: int, *, niter: int = 20, seed: int = 0, coarse_k: int | None = None,
                 refine_iters: int = 2, max_points_per_centroid: int = 256, nprobe: int = 8) -> KMeansResult:
    """Two-stage k-means for large N * k: coarse cells, split each, refine globally.

    1. k-means with ``coarse_k`` (default sqrt(k)) centroids; every point goes
       to its nearest coarse cell.
    2. Each cell with n_c points gets k_c ~ k * n_c / N centroids (at least
       one, at most n_c) from a k-means over its own points only.
    3. ``refine_iters`` global Lloyd iterations: assign all points to all k
       centroids through an IVF index, recompute means. This lets points near
       cell borders move to the right centroid.

    X: (N, D) float32. Returns centroids (k, D), assignment (N,), distance (N,).
    """
    X = _as_points(X)
    n = X.shape[0]
    if k > n:
        raise KMeansError(f"k={k} is larger than the {n} points; clamp it first (clamp_k)")
    kc = coarse_k or max(2, int(round(math.sqrt(k))))
    kc = min(kc, k)
    coarse = _faiss_kmeans(X, kc, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid)
    cell, _ = assign(X, coarse, approximate=False)
    sizes = np.bincount(cell, minlength=kc)
    alloc = np.zeros(kc, dtype=np.int64)
    nonempty = sizes > 0
    alloc[nonempty] = _proportional_split(sizes[nonempty], k)
    order = np.argsort(cell, kind="stable")
    bounds = np.r_[0, np.cumsum(sizes)]
    centroids = np.empty((int(alloc.sum()), X.shape[1]), dtype=np.float32)
    assignment = np.empty(n, dtype=np.int64)
    distance = np.empty(n, dtype=np.float32)
    offset = 0
    for c in range(kc):
        if alloc[c] == 0:
            continue
        idx = order[bounds[c]:bounds[c + 1]]
        Xc = X[idx]
        kk = int(alloc[c])
        if kk == 1:
            Cc = Xc.mean(axis=0, keepdims=True).astype(np.float32)
        elif kk == len(idx):
            Cc = Xc.copy()
        else:
            Cc = _faiss_kmeans(Xc, kk, niter=niter, seed=seed + 1 + c,
                               max_points_per_centroid=max_points_per_centroid)
        a, dd = assign(Xc, Cc, approximate=False)
        centroids[offset:offset + kk] = Cc
        assignment[idx] = a + offset
        distance[idx] = dd
        offset += kk
    for it in range(refine_iters):
        centroids = centroid_means(X, assignment, centroids.shape[0], previous=centroids)
        assignment, distance = assign(X, centroids, nprobe=nprobe, seed=seed + 7919 + it)
    return KMeansResult(centroids, assignment, distance)


# -- resampling ---------------------------------------------------------------

def _resample_indices(assignment: np.ndarray, distance: np.ndarray, k: int, sample_size: int,
                      strategy: str, rng: np.random.Generator) -> np.ndarray:
    """Indices of up to ``sample_size`` inputs per cluster: closest to the centroid, or random."""
    if strategy == "closest":
        prio = distance.astype(np.float64)
    elif strategy == "random":
        prio = rng.random(assignment.shape[0])
    else:
        raise KMeansError(f"unknown resampling strategy {strategy!r} (closest|random)")
    order = np.lexsort((np.arange(assignment.shape[0]), prio, assignment))
    a_sorted = assignment[order]
    counts = np.bincount(assignment, minlength=k)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    rank = np.arange(order.shape[0]) - starts[a_sorted]
    return np.sort(order[rank < sample_size])


def default_sample_size(n_inputs: int, k: int) -> int:
    """Roughly half the mean cluster size, as the reference configs use (at least 1)."""
    return max(1, int(round(n_inputs / max(k, 1) / 2)))


def _cluster_level(X: np.ndarray, k: int, *, method: str, niter: int, seed: int,
                   max_points_per_centroid: int) -> tuple[KMeansResult, str]:
    n = X.shape[0]
    if method == "auto":
        method = "split" if n * k > SPLIT_WORK and k >= 1024 else "flat"
    if method == "split":
        return split_kmeans(X, k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid), method
    if method == "flat":
        return kmeans(X, k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid), method
    raise KMeansError(f"unknown level method {method!r} (auto|flat|split)")


def hierarchical_kmeans(
    X: np.ndarray,
    levels: Sequence[int],
    *,
    resampling_steps: int | Sequence[int] = 10,
    sample_sizes: int | Sequence[int] | None = None,
    sample_strategy: str = "closest",
    niter: int = 20,
    seed: int = 0,
    method: str = "auto",
    max_points_per_centroid: int = 256,
    progress: bool = True,
) -> Hierarchy:
    """Hierarchical k-means with resampling.

    X: (N, D) float32 points (rows must be finite). ``levels`` gives k per
    level, finest first (e.g. ``[10000, 1000, 100]``); k larger than a level's
    inputs is clamped with a warning (see ``Hierarchy.warnings``) and each
    level's k is also clamped to the previous level's.

    ``resampling_steps``: an int applies to every level, except to level 1
    when it is large (N * k > LEVEL1_RESAMPLE_WORK, where each step would
    cost a k-means and a full assignment of all points; the reference skips
    level 1 for the same reason); a list gives one count per level. ``sample_sizes``:
    inputs taken per cluster in a resampling step (default: half the mean
    cluster size of the level). ``method`` applies to level 1 (auto, flat or
    split); upper levels are always flat.
    """
    from webcurate.shards.progress import progress_bar

    X = _as_points(X)
    L = len(levels)
    if L == 0:
        raise KMeansError("levels must name at least one k, e.g. 10000,1000,100")
    if isinstance(resampling_steps, (int, np.integer)):
        steps = [int(resampling_steps)] * L
        if X.shape[0] * min(int(levels[0]), X.shape[0]) > LEVEL1_RESAMPLE_WORK:
            steps[0] = 0
    else:
        steps = [int(x) for x in resampling_steps]
    if len(steps) != L:
        raise KMeansError(f"resampling_steps has {len(steps)} entries for {L} levels")
    if sample_sizes is None or isinstance(sample_sizes, int):
        sizes: list[int | None] = [sample_sizes] * L
    else:
        sizes = list(sample_sizes)
        if len(sizes) != L:
            raise KMeansError(f"sample_sizes has {len(sizes)} entries for {L} levels")
    hier = Hierarchy()
    bar = progress_bar(total=L + sum(steps), desc="k-means", unit="step") if progress else None
    inputs = X
    try:
        for t, k_req in enumerate(levels):
            k, warn = clamp_k(int(k_req), inputs.shape[0], what=f"level {t + 1} k")
            if warn:
                hier.warnings.append(warn)
                warnings.warn(warn, stacklevel=2)
            lseed = seed * 1000003 + t * 101
            res, used = _cluster_level(inputs, k, method=method if t == 0 else "flat", niter=niter,
                                       seed=lseed, max_points_per_centroid=max_points_per_centroid)
            if bar is not None:
                bar.update(1)
            s = sizes[t] if sizes[t] is not None else default_sample_size(inputs.shape[0], k)
            rng = np.random.default_rng([seed, t])
            for step in range(steps[t]):
                pick = _resample_indices(res.assignment, res.distance, k, int(s), sample_strategy, rng)
                sub = inputs[pick]
                kk = min(k, sub.shape[0])
                C = _faiss_kmeans(sub, kk, niter=niter, seed=lseed + 17 * (step + 1),
                                  max_points_per_centroid=max_points_per_centroid)
                a, dd = assign(inputs, C, seed=lseed + step)
                res = KMeansResult(C, a, dd)
                if bar is not None:
                    bar.update(1)
            hier.levels.append(Level(
                requested_k=int(k_req), centroids=res.centroids, assignment=res.assignment.astype(np.int64),
                distance=res.distance, resampling_steps=steps[t], sample_size=int(s) if steps[t] else 0,
                method=used,
            ))
            inputs = res.centroids
    finally:
        if bar is not None:
            bar.close()
    return hier
