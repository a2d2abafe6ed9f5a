"""Embedding sidecars and the faiss helpers dedup and retrieval share.

- reading: ``load_embeddings`` / ``read_embeddings`` stream the
  ``embeddings`` parts of a dataset into one float32 (N, D) matrix, rows
  re-normalised (float16 storage loses a little), failed samples left out,
  NaN refused with the keys that carry it;
- search: ``build_index`` picks exact ``IndexFlatIP`` for small N and
  ``IndexIVFFlat`` (inner product) for large N; ``search`` runs queries in
  chunks so memory stays (chunk x k), never N x N;
- graphs: ``knn_edges`` turns a kNN search into thresholded edges;
- clustering: ``kmeans`` (faiss, spherical, seeded) for SemDeDup and
  cluster-based retrieval.

All vectors here are L2-normalised, so inner product = cosine similarity.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from webcurate.shards.errors import ConfigError
from webcurate.shards.dataset import DatasetError

STAGE = "embeddings"
# Exact search up to this many database vectors; IVF above (flat kNN of N
# queries costs N^2 D, about 10 s at 30k x 384 on 2 cores, and grows fast).
FLAT_MAX = 30_000
# Queries per faiss call: bounds the result block to chunk x k.
SEARCH_CHUNK = 16_384


class EmbeddingError(DatasetError):
    """Embeddings are missing, NaN, or incompatible with each other."""


@dataclass
class Embeddings:
    """The embeddings of one dataset, ready for search.

    keys: N sample keys; shards: (N,) int32 shard of each key;
    vectors: (N, D) float32, L2-normalised; info: the manifest stage entry
    (model, dim, weights_sha256, ...); failed: samples without an embedding.
    """

    root: str
    keys: list[str]
    shards: np.ndarray
    vectors: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    failed: int = 0
    filtered: int = 0  # samples the dataset's `webcurate filter` removed (left out here)
    filter_run: str | None = None

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def model(self) -> str | None:
        return self.info.get("model")

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this embedding set in downstream stage parameters."""
        fp = {"model": self.model, "weights_sha256": self.info.get("weights_sha256"),
              "dim": self.dim, "n": self.n, "shards": int(len(np.unique(self.shards)))}
        if self.filter_run:  # a change of filter decisions recomputes what depends on these vectors
            fp["filter"] = self.filter_run
        return fp


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of (N, D) float32, in place; zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, np.maximum(norms, 1e-12), out=x)
    return x


def embedding_info(root: str) -> dict[str, Any]:
    """The manifest entry of the ``embeddings`` stage (model, dim, weights_sha256, ...)."""
    from webcurate.shards.dataset import Dataset

    return dict(Dataset(root).manifest.get("stages", {}).get(STAGE, {}))


def read_embeddings(root: str, *, what: str = "dataset") -> Embeddings:
    """All embeddings of dataset ``root`` (failed samples left out).

    Raises EmbeddingError when the dataset has no complete embeddings sidecar
    (some shards not embedded counts as incomplete), or when any stored
    vector holds NaN/inf. ``what`` names the dataset's role in messages.
    """
    import pyarrow.compute as pc

    from webcurate.shards.dataset import Dataset

    ds = Dataset(root)
    shards = ds.completed_shards()
    done = set(ds.sidecar_completed(STAGE))
    info = dict(ds.manifest.get("stages", {}).get(STAGE, {}))
    if not done:
        raise EmbeddingError(
            f"{what} {root} has no embeddings; run `webcurate embed --input {root} --model NAME ...` first"
        )
    missing = [s for s in shards if s not in done]
    if missing:
        raise EmbeddingError(
            f"{what} {root}: {len(missing)} of {len(shards)} shards are not embedded yet "
            f"(e.g. {', '.join(f'{s:05d}' for s in missing[:5])}); re-run `webcurate embed` on it to finish"
        )
    keys: list[str] = []
    shard_ids: list[np.ndarray] = []
    mats: list[np.ndarray] = []
    failed = 0
    dim = info.get("dim")
    for s in shards:
        t = ds.read_sidecar_part(STAGE, s, columns=["key", "embedding", "status"])
        ok = pc.and_(pc.equal(t["status"], "ok"), pc.is_valid(t["embedding"]))
        failed += t.num_rows - int(pc.sum(ok).as_py() or 0)
        t = t.filter(ok)
        if t.num_rows == 0:
            continue
        col = t["embedding"].combine_chunks()
        d = col.type.list_size
        if dim is None:
            dim = d
        if d != dim:
            raise EmbeddingError(f"{what} {root}: shard {s:05d} has {d}-d embeddings, the others {dim}-d")
        mats.append(np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, d))
        keys.extend(t["key"].to_pylist())
        shard_ids.append(np.full(t.num_rows, s, dtype=np.int32))
    x = np.concatenate(mats) if mats else np.zeros((0, int(dim or 0)), np.float32)
    del mats
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        examples = ", ".join(keys[i] for i in np.flatnonzero(bad)[:5])
        raise EmbeddingError(
            f"{what} {root}: {int(bad.sum())} embeddings hold NaN/inf (e.g. keys {examples}); "
            "re-embed the dataset (delete its embeddings/ folder first)"
        )
    normalize(x)
    shard_col = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32)
    # Samples `webcurate filter` removed are left out of every stage that reads vectors.
    from webcurate.shards.global_stage import stage_run

    from .filter import filtered_keys

    dropped = filtered_keys(ds)
    kept = np.fromiter((k not in dropped for k in keys), dtype=bool, count=len(keys)) if dropped else None
    if kept is not None:
        x, shard_col, keys = x[kept], shard_col[kept], [k for k, kp in zip(keys, kept) if kp]
    return Embeddings(root=root, keys=keys, shards=shard_col, vectors=x, info=info, failed=failed,
                      filtered=0 if kept is None else int((~kept).sum()),
                      filter_run=stage_run(root, "filter") if dropped else None)


def load_embeddings(root: str) -> tuple[list[str], np.ndarray]:
    """Keys and float32 (N, D) L2-normalised embeddings of dataset ``root``."""
    e = read_embeddings(root)
    return e.keys, e.vectors


def check_compatible(a: Embeddings, b: Embeddings) -> None:
    """Refuse to compare embeddings from different spaces (dim, model or weights differ)."""
    if a.dim != b.dim:
        raise EmbeddingError(
            f"embedding dimensions differ: {a.root} has {a.dim}-d ({a.model}), {b.root} has {b.dim}-d "
            f"({b.model}); embed both with the same --model and weights"
        )
    wa, wb = a.info.get("weights_sha256"), b.info.get("weights_sha256")
    if a.model != b.model or (wa and wb and wa != wb):
        raise EmbeddingError(
            f"embeddings come from different models: {a.root} from {a.model} (weights {str(wa)[:19]}), "
            f"{b.root} from {b.model} (weights {str(wb)[:19]}); embed both with the same --model and weights"
        )


def clamp_k(k: int, n: int, what: str = "k") -> int:
    """``min(k, n)`` with a warning when k had to shrink; k must be positive."""
    if k < 1:
        raise ConfigError(f"{what} must be at least 1, got {k}")
    if k > n:
        warnings.warn(f"{what}={k} is larger than the {n} vectors searched; using {what}={n}", stacklevel=3)
        return n
    return k


@dataclass(frozen=True)
class IndexChoice:
    """How to index N vectors: exact flat, or IVF with ``nlist`` cells probed ``nprobe`` at a time."""

    kind: str  # "flat" | "ivf"
    nlist: int = 0
    nprobe: int = 0
    train_size: int = 0


# Queries per IVF search block handed to one thread (cell-ordered, so a block
# revisits the same cells while they are in cache).
IVF_QUERY_BLOCK = 4096
# IVF k-means for the cells: Lloyd iterations and training points per cell.
IVF_NITER = 10
IVF_TRAIN_PER_LIST = 20


def choose_index(n: int, *, kind: str = "auto", nlist: int | None = None, nprobe: int | None = None) -> IndexChoice:
    """Flat for ``n <= FLAT_MAX`` (or ``kind="flat"``), else IVF.

    IVF defaults: nlist = 4 sqrt(N) (4000 at 1M), nprobe = 10. A query costs
    nlist x D (finding its cells: one BLAS product, cheap per flop) plus
    nprobe x N/nlist x D (scanning them); at 4 sqrt(N) cells the two are
    about equal, and finer cells follow the data's concepts more closely,
    which keeps near-duplicates within the probed cells (bench/dedup_1m.py
    measures the recall against exact search). Cells are trained on at most
    20 points each (10 Lloyd iterations): enough to place cells, and training
    stays a fraction of the search.
    """
    if kind not in ("auto", "flat", "ivf"):
        raise ConfigError(f"index kind must be auto, flat or ivf, got {kind!r}")
    if kind == "flat" or (kind == "auto" and n <= FLAT_MAX):
        return IndexChoice("flat")
    nl = int(nlist or max(16, min(65536, 4 * int(math.sqrt(n)))))
    nl = max(1, min(nl, n // 8 or 1))
    npb = int(nprobe or 10)
    return IndexChoice("ivf", nl, min(npb, nl), min(n, IVF_TRAIN_PER_LIST * nl))


def _train_cells(x: np.ndarray, choice: IndexChoice, seed: int) -> np.ndarray:
    """Spherical k-means centroids (nlist, D) of a random sample of ``x``."""
    import faiss

    n, d = x.shape
    rng = np.random.default_rng(seed)
    sample = x if choice.train_size >= n else x[np.sort(rng.choice(n, choice.train_size, replace=False))]
    km = faiss.Kmeans(d, choice.nlist, niter=IVF_NITER, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=IVF_TRAIN_PER_LIST, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(sample))
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def build_index(x: np.ndarray, choice: IndexChoice | None = None, *, seed: int = 0):
    """A faiss inner-product index over ``x`` (N, D) float32 normalised (flat or IVF)."""
    import faiss

    n, d = x.shape
    choice = choice or choose_index(n)
    if choice.kind == "flat":
        index = faiss.IndexFlatIP(d)
        index.add(x)
        return index
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(_train_cells(x, choice, seed))
    index = faiss.IndexIVFFlat(quantizer, d, choice.nlist, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True  # cells trained above; faiss's wrapper keeps `quantizer` alive
    for start in range(0, n, 262_144):  # add in chunks: bounded temporary assignment arrays
        index.add(x[start:start + 262_144])
    index.nprobe = choice.nprobe
    return index


def search(index, queries: np.ndarray, k: int, *, desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k nearest database vectors of each query: sims (Q, k) float32, ids (Q, k) int64 (-1 = none)."""
    from webcurate.shards.progress import progress_bar

    q = queries.shape[0]
    sims = np.empty((q, k), dtype=np.float32)
    ids = np.empty((q, k), dtype=np.int64)
    bar = progress_bar(total=q, desc=desc, unit="q") if desc and q > SEARCH_CHUNK else None
    for start in range(0, q, SEARCH_CHUNK):
        s, i = index.search(np.ascontiguousarray(queries[start:start + SEARCH_CHUNK]), k)
        sims[start:start + len(s)] = s
        ids[start:start + len(s)] = i
        if bar is not None:
            bar.update(len(s))
    if bar is not None:
        bar.close()
    return sims, ids


def _self_knn_chunks(x: np.ndarray, kk: int, choice: IndexChoice, seed: int, timings: dict[str, float]):
    """Yield ``(rows, sims, ids)`` chunks of every row's ``kk`` nearest rows of ``x`` itself.

    Flat: exact search in row order. IVF: queries are the database, so each
    row's cells are found once (one BLAS pass over the centroids) and used
    twice, to add the row to its nearest cell and to probe its ``nprobe``
    nearest cells; queries then run in cell order, so consecutive queries
    scan the same cells while they are still in cache.
    """
    import time

    import faiss

    n, d = x.shape
    t = time.time()
    if choice.kind == "flat":
        index = build_index(x, choice)
        timings["index_build"] = time.time() - t
        for start in range(0, n, SEARCH_CHUNK):
            rows = np.arange(start, min(n, start + SEARCH_CHUNK), dtype=np.int64)
            s, i = index.search(np.ascontiguousarray(x[start:start + SEARCH_CHUNK]), kk)
            yield rows, s, i
        return
    centroids = _train_cells(x, choice, seed)
    timings["ivf_train"] = time.time() - t
    t = time.time()
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(centroids)
    cell_d = np.empty((n, choice.nprobe), dtype=np.float32)
    cell_i = np.empty((n, choice.nprobe), dtype=np.int64)
    for start in range(0, n, SEARCH_CHUNK * 4):
        cd, ci = quantizer.search(np.ascontiguousarray(x[start:start + SEARCH_CHUNK * 4]), choice.nprobe)
        cell_d[start:start + len(cd)], cell_i[start:start + len(cd)] = cd, ci
    index = faiss.IndexIVFFlat(quantizer, d, choice.nlist, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    index.nprobe = choice.nprobe
    from faiss.contrib.ivf_tools import add_preassigned

    for start in range(0, n, 262_144):
        add_preassigned(index, np.ascontiguousarray(x[start:start + 262_144]),
                        np.ascontiguousarray(cell_i[start:start + 262_144, 0]))
    timings["ivf_assign_add"] = time.time() - t
    order = np.argsort(cell_i[:, 0], kind="stable")
    # search_preassigned() runs on one core (faiss only splits queries over
    # threads in search()). Python threads each take the next block of queries
    # (faiss releases the GIL): all cores work, and a core another process
    # holds just takes fewer blocks instead of stalling an OpenMP barrier.
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def run(rows: np.ndarray):
        s, i = index.search_preassigned(np.ascontiguousarray(x[rows]), kk, cell_i[rows], cell_d[rows])
        return rows, s, i

    workers = max(1, faiss.omp_get_max_threads())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for start in range(0, n, IVF_QUERY_BLOCK):
            pending.append(pool.submit(run, order[start:start + IVF_QUERY_BLOCK]))
            if len(pending) >= 2 * workers:  # bounded results in flight
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def knn_edges(
    x: np.ndarray, k: int, threshold: float, *, index=None, choice: IndexChoice | None = None,
    seed: int = 0, desc: str | None = "knn graph", timings: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges of the kNN graph of ``x`` (N, D) with cosine > ``threshold``.

    Each point's ``k`` nearest other points are searched (self excluded) in
    ``index`` when given, else in a flat or IVF index over ``x`` chosen by
    ``choose_index`` (or ``choice``). Returns ``(src, dst, sim)``
    int64/int64/float32 arrays with src < dst, each undirected edge once.
    Memory is (chunk x k) per step plus the edges that pass the threshold.
    ``timings`` (optional) receives seconds per phase.
    """
    import time

    from webcurate.shards.progress import progress_bar

    n = x.shape[0]
    phases: dict[str, float] = {}
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    kk = min(k + 1, n)  # +1: a point finds itself first
    if index is not None:
        def chunks():
            for start in range(0, n, SEARCH_CHUNK):
                s, i = index.search(np.ascontiguousarray(x[start:start + SEARCH_CHUNK]), kk)
                yield np.arange(start, start + len(s), dtype=np.int64), s, i
        it = chunks()
    else:
        it = _self_knn_chunks(x, kk, choice or choose_index(n), seed, phases)
    srcs, dsts, sims_out = [], [], []
    bar = progress_bar(total=n, desc=desc, unit="q") if desc and n > SEARCH_CHUNK else None
    t0 = time.time()
    for rows, s, i in it:
        r = rows[:, None]
        keep = (s > threshold) & (i >= 0) & (i != r)
        a = np.broadcast_to(r, i.shape)[keep]
        b = i[keep]
        srcs.append(np.minimum(a, b))
        dsts.append(np.maximum(a, b))
        sims_out.append(s[keep])
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    # The generator builds its index lazily inside the loop: search = the rest.
    phases["knn_search"] = time.time() - t0 - sum(phases.values())
    if timings is not None:
        timings.update({k_: round(v, 3) for k_, v in phases.items()})
    src, dst, sim = np.concatenate(srcs), np.concatenate(dsts), np.concatenate(sims_out)
    if len(src):  # both ends usually find each other: keep one copy of each edge
        order = np.lexsort((dst, src))
        src, dst, sim = src[order], dst[order], sim[order]
        first = np.ones(len(src), dtype=bool)
        first[1:] = (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])
        src, dst, sim = src[first], dst[first], sim[first]
    return src, dst, sim.astype(np.float32)


def kmeans(x: np.ndarray, n_clusters: int, *, niter: int = 20, seed: int = 0,
           max_points_per_centroid: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Spherical faiss k-means: centroids (K, D) float32 normalised and assignment (N,) int64."""
    import faiss

    n, d = x.shape
    k = clamp_k(n_clusters, n, "n_clusters")
    if k == 1:
        c = normalize(x.mean(axis=0, keepdims=True).astype(np.float32))
        return c, np.zeros(n, dtype=np.int64)
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x))
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    index = build_index(centroids, IndexChoice("flat"))
    _, assign = search(index, x, 1)
    return centroids, assign[:, 0].astype(np.int64)


def pairwise_dot(x: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 262_144) -> np.ndarray:
    """Cosine of pairs (a[i], b[i]) of rows of ``x``: (len(a),) float32, computed in chunks."""
    out = np.empty(len(a), dtype=np.float32)
    for s in range(0, len(a), chunk):
        out[s:s + chunk] = np.einsum("ij,ij->i", x[a[s:s + chunk]], x[b[s:s + chunk]])
    return out


def write_sidecar_parts(ds, stage: str, shards: list[int], rows_per_shard: list[np.ndarray], part, stats) -> None:
    """Write ``part(rows)`` as each shard's sidecar part and record it in the manifest.

    Uploads overlap in threads; each part is recorded as soon as it has
    landed, so a run killed while writing keeps the parts already written.
    """
    from concurrent.futures import ThreadPoolExecutor

    from webcurate.shards.progress import progress_bar
    from webcurate.shards import manifest as manifest_mod

    bar = progress_bar(total=len(shards), desc=f"write {stage}", unit="part")
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [(s, rows, pool.submit(ds.write_sidecar, stage, s, part(rows)))
                   for s, rows in zip(shards, rows_per_shard)]
        try:
            for s, rows, fut in futures:
                fut.result()
                manifest_mod.record_shard(ds.root, s, stats(rows), stage=stage)
                bar.update(1)
        finally:
            bar.close()
