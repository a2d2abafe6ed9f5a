"""``webcurate cluster``: hierarchical k-means over a dataset's embeddings, as Ray tasks.

The selection clustered (``--subset auto``): the retrieved samples when a
``retrieve`` sidecar exists, else the ``dedup`` survivors, else everything.

1. ``sample_task``: every run of parts writes a seeded share of its selected
   vectors to the stage's scratch folder (scratch.py; all of them when the
   pool fits ``--memory-per-task``: the result is then exactly the
   one-process clustering);
2. ``train_task``: hierarchical k-means with resampling (``kmeans.py``) on
   that sample; when the sample holds fewer than ``MIN_PER_CENTROID`` points
   per level-1 centroid, ``REFINE_ITERS`` distributed Lloyd iterations over
   every part move the level-1 centroids (sums and counts reduced in the
   driver) and the upper levels are re-clustered on them;
3. ``write_task``: every part assigns its vectors to the nearest level-1
   centroid (exact), derives the upper levels through the parent maps and
   writes ``<root>/clusters/part-<shard>.parquet``: key, status (``ok``,
   ``duplicate`` when dedup removed it, ``not_retrieved``), ``level_1`` ..
   ``level_L`` (int32, -1 when not clustered) and ``distance`` (float32 L2
   distance to the level-1 centroid, NaN when not clustered).

Also ``<root>/clusters/centroids_level_<t>.npy`` ((k_t, D) float32) and
``parents_level_<t>.npy`` ((k_t,) int32, the level-(t+1) cluster of each
level-t centroid). The driver holds only centroids and per-cluster counts.
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from webcurate.shards import storage
from webcurate.shards.dataset import Dataset, DatasetError
from webcurate.shards.stage import StageResult

from .embedding_parts import EmbeddingSet, embedding_set, mismatch_counts, mismatch_warning, read_part
from . import scratch
from .ray_tasks import map_tasks, shard_blocks
from .stage_params import ClusterParams, TaskResources

STAGE = "clusters"
DEDUP, RETRIEVE = "dedup", "retrieve"
STATUS_OK, STATUS_DUPLICATE, STATUS_NOT_RETRIEVED = "ok", "duplicate", "not_retrieved"
MIN_PER_CENTROID = 32
REFINE_ITERS = 2


def resolve_subset(ds: Dataset, subset: str) -> str:
    """Which keys to cluster: ``auto`` -> retrieve (when it exists), else dedup, else all."""
    from webcurate.shards.global_stage import require_complete

    if subset != "auto":
        if subset != "all":
            require_complete(ds, subset, "dedup" if subset == DEDUP else "retrieve")
        return subset
    for stage in (RETRIEVE, DEDUP):
        if ds.sidecar_completed(stage):
            require_complete(ds, stage, "dedup" if stage == DEDUP else "retrieve")
            return stage
    return "all"


def part_points(root: str, shard: int, dim: int, subset: str, part=None):
    """A part's embedded keys, their status under ``subset`` and the vectors of the ``ok`` ones."""
    part = part or read_part(root, shard, dim)
    keys = part.keys
    status = np.full(len(keys), STATUS_OK, dtype=object)
    if subset in (DEDUP, RETRIEVE):
        col = "keep" if subset == DEDUP else "selected"
        t = Dataset(root).read_sidecar_part(subset, shard, columns=["key", col])
        out = {k for k, v in zip(t["key"].to_pylist(), t[col].to_pylist()) if not v}
        gone = np.fromiter((k in out for k in keys), dtype=bool, count=len(keys))
        status[gone] = STATUS_DUPLICATE if subset == DEDUP else STATUS_NOT_RETRIEVED
    return keys, status, part.vectors[status == STATUS_OK]


def sample_task(block: int, *, shards: list[int], out: str, root: str, dim: int, subset: str, rate: float,
                seed: int) -> int:
    """Write a seeded share ``rate`` of a run of parts' selected vectors (row order) to ``out``; points selected."""
    n, got = 0, []
    for shard in shards:
        _, _, x = part_points(root, shard, dim, subset)
        n += len(x)
        got.append(x if rate >= 1 else x[np.random.default_rng([seed, shard]).random(len(x)) < rate])
    scratch.write_batches(out, [{"x": np.concatenate(got) if got else np.zeros((0, dim), np.float32)}])
    return n


def train_task(_: int, *, samples: list[str], params: dict) -> dict:
    """Hierarchical k-means of the concatenated sample files: centroids, parents, per-level info, warnings."""
    from .kmeans import hierarchical_kmeans

    x = np.concatenate([scratch.read_batch(u, 0)["x"] for u in samples])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # collected in hier.warnings
        hier = hierarchical_kmeans(x, params["levels"], resampling_steps=params["steps"],
                                   sample_sizes=params["sizes"], sample_strategy=params["strategy"],
                                   niter=params["niter"], seed=params["seed"], method=params["method"],
                                   progress=False)
    return {"centroids": [lv.centroids for lv in hier.levels],
            "parents": [hier.parents(t) for t in range(1, len(hier.levels))],
            "levels": [{"k_requested": lv.requested_k, "k": lv.k, "resampling_steps": lv.resampling_steps,
                        "sample_size": lv.sample_size, "method": lv.method} for lv in hier.levels],
            "warnings": list(hier.warnings), "points": int(len(x))}


def lloyd_task(shard: int, *, root: str, dim: int, subset: str, centroids: np.ndarray) -> tuple:
    """One Lloyd step's share of one part: per-centroid sums (k, D) float64 and counts."""
    from .kmeans import assign

    _, _, x = part_points(root, shard, dim, subset)
    k = centroids.shape[0]
    sums = np.zeros((k, dim), dtype=np.float64)
    if len(x):
        a, _ = assign(x, centroids, approximate=False)
        np.add.at(sums, a, x.astype(np.float64))
        return sums, np.bincount(a, minlength=k)
    return sums, np.zeros(k, dtype=np.int64)


def refine(root: str, shards: list[int], dim: int, subset: str, trained: dict, params: dict,
           memory: int) -> dict:
    """Distributed Lloyd iterations on level 1, then the upper levels again on the moved centroids."""
    c1 = trained["centroids"][0]
    for _ in range(REFINE_ITERS):
        acc = {"sums": np.zeros_like(c1, dtype=np.float64), "counts": np.zeros(len(c1), np.int64)}

        def take(_: int, r: tuple) -> None:
            acc["sums"] += r[0]
            acc["counts"] += r[1]

        map_tasks(lloyd_task, shards, kwargs={"root": root, "dim": dim, "subset": subset, "centroids": c1},
                  desc="lloyd", memory=memory, on_result=take)
        nz = acc["counts"] > 0
        c1 = c1.copy()
        c1[nz] = (acc["sums"][nz] / acc["counts"][nz, None]).astype(np.float32)
    if len(params["levels"]) == 1:
        return {**trained, "centroids": [c1]}
    from .kmeans import hierarchical_kmeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hier = hierarchical_kmeans(c1, params["levels"][1:], resampling_steps=_tail(params["steps"]),
                                   sample_sizes=_tail(params["sizes"]), sample_strategy=params["strategy"],
                                   niter=params["niter"], seed=params["seed"] + 1, method="flat", progress=False)
    return {**trained, "centroids": [c1] + [lv.centroids for lv in hier.levels],
            "parents": [lv.assignment.astype(np.int32) for lv in hier.levels[:1]]
            + [hier.parents(t) for t in range(1, len(hier.levels))]}


def _tail(v: Any) -> Any:
    return v[1:] if isinstance(v, list) else v


def write_task(shard: int, *, root: str, dim: int, subset: str, centroids: np.ndarray, parents: list,
               num_levels: int) -> dict:
    """Assign one part's points and write its clusters part (every embedded key gets a row)."""
    import pyarrow as pa

    from .kmeans import assign

    part = read_part(root, shard, dim)
    keys, status, x = part_points(root, shard, dim, subset, part)
    ok = status == STATUS_OK
    labels = np.full((len(keys), num_levels), -1, dtype=np.int32)
    dist = np.full(len(keys), np.nan, dtype=np.float32)
    if len(x):
        a, d = assign(x, centroids, approximate=False)
        cur = a
        labels[ok, 0] = cur
        for t, par in enumerate(parents, start=1):
            cur = par[cur]
            labels[ok, t] = cur
        dist[ok] = d
    cols: dict[str, Any] = {"key": pa.array(keys, pa.string()), "status": pa.array(status.tolist(), pa.string())}
    for t in range(num_levels):
        cols[f"level_{t + 1}"] = pa.array(labels[:, t], pa.int32())
    cols["distance"] = pa.array(dist, pa.float32())
    Dataset(root).write_sidecar(STAGE, shard, pa.table(cols))
    return {"counts": {"total": len(keys), "clustered": int(ok.sum()),
                       "duplicate": int((status == STATUS_DUPLICATE).sum()),
                       "not_retrieved": int((status == STATUS_NOT_RETRIEVED).sum()), **mismatch_counts(part)}}


def sizes_task(shard: int, *, root: str, ks: list[int]) -> list[np.ndarray]:
    """Points per cluster at every level in one written part."""
    from webcurate.shards.dataset import Dataset as _D

    t = _D(root).read_sidecar_part(STAGE, shard)
    out = []
    for lvl, k in enumerate(ks, start=1):
        ids = t[f"level_{lvl}"].to_numpy(zero_copy_only=False)
        out.append(np.bincount(ids[ids >= 0], minlength=k))
    return out


def _save_npy(uri: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    storage.write_bytes(uri, buf.getvalue())


def load_centroids(root: str, level: int) -> np.ndarray:
    """(k_t, D) float32 centroids of level ``level`` (1-based) saved by the cluster stage."""
    return np.load(io.BytesIO(storage.read_bytes(storage.join(root, STAGE, f"centroids_level_{level}.npy"))),
                   allow_pickle=False)


def load_parents(root: str, level: int) -> np.ndarray:
    """(k_t,) int32: the level-(t+1) cluster of each level-t centroid (1-based t < L)."""
    return np.load(io.BytesIO(storage.read_bytes(storage.join(root, STAGE, f"parents_level_{level}.npy"))),
                   allow_pickle=False)


def _parameters(ds: Dataset, params: ClusterParams, subset: str, emb: EmbeddingSet) -> dict[str, Any]:
    from webcurate.shards.global_stage import stage_run

    rec = params.as_record()
    rec.update(subset=subset, upstream={"embeddings": emb.fingerprint(),
                                        **({subset: stage_run(ds.root, subset)} if subset in (DEDUP, RETRIEVE) else {})})
    return rec


def _train(root: str, emb: EmbeddingSet, subset: str, rate: float, p: dict, mem: int) -> tuple[dict, int]:
    """Sample every part (to scratch files, not the driver) and train the hierarchy: (trained, points selected)."""
    blocks = shard_blocks(list(emb.shards))
    with scratch.Scratch(root, "cluster") as tmp:
        files = [tmp.file(f"{b:06d}.arrow") for b in range(len(blocks))]
        got = map_tasks(sample_task, range(len(blocks)), kwargs={"root": root, "dim": emb.dim, "subset": subset,
                                                                  "rate": rate, "seed": p["seed"]},
                        per_item={b: {"shards": blocks[b], "out": files[b]} for b in range(len(blocks))},
                        desc="sample", memory=mem)
        n_ok = sum(got.values())
        if n_ok == 0:
            raise DatasetError(f"{root} has no embeddings left to cluster (none in the `{subset}` selection)")
        trained = map_tasks(train_task, [0], kwargs={"samples": files, "params": p}, desc="k-means", memory=mem)[0]
    return trained, n_ok


def run_cluster(input: str, *, summary: bool = True, resources: TaskResources | dict | None = None,
                **options: Any) -> StageResult:
    """Cluster the dataset at ``input`` and write the ``clusters`` sidecar; ``options`` are ``ClusterParams``.

    Returns the ``StageResult``: ``info["levels"]`` per level (k asked, k
    used, non-empty clusters, min/median/max size), ``warnings`` (e.g. a k
    lowered to the number of inputs) and ``totals`` (clustered, duplicate, ...).
    """
    from webcurate.shards.global_stage import GlobalStage, require_complete
    from webcurate.shards.params import parse

    params = parse(ClusterParams, options, "cluster")
    res = resources if isinstance(resources, TaskResources) else parse(TaskResources, resources or {}, "resources")
    ds = Dataset(input)
    require_complete(ds, "embeddings", "embed")
    emb = embedding_set(input)
    subset = resolve_subset(ds, params.subset)
    stage = GlobalStage(ds, STAGE, _parameters(ds, params, subset, emb), command="cluster")
    if stage.is_complete():
        result = stage.skipped()
        result.warnings = list(result.info.get("warnings", []))
        if summary:
            print(f"clusters of {ds.root} are complete with these parameters; nothing to do")
        return result
    stage.start()
    mem = res.task_memory()
    budget = max(1024, mem // (4 * 4 * max(emb.dim, 1)))
    rate = min(1.0, budget / max(emb.rows, 1))
    p = {"levels": params.levels, "steps": params.resampling_steps, "sizes": params.sample_size,
         "strategy": params.sample_strategy, "niter": params.niter, "seed": params.seed, "method": params.method}
    trained, n_ok = _train(ds.root, emb, subset, rate, p, mem)
    if trained["points"] < n_ok and trained["points"] < MIN_PER_CENTROID * trained["levels"][0]["k"]:
        trained = refine(ds.root, emb.shards, emb.dim, subset, trained, p, mem)
    for t, c in enumerate(trained["centroids"], start=1):
        _save_npy(storage.join(ds.root, STAGE, f"centroids_level_{t}.npy"), c)
        if t < len(trained["centroids"]):
            _save_npy(storage.join(ds.root, STAGE, f"parents_level_{t}.npy"), trained["parents"][t - 1])
    num_levels = len(trained["centroids"])
    result = stage.write_parts(write_task, memory=mem, kwargs={
        "dim": emb.dim, "subset": subset, "centroids": trained["centroids"][0], "parents": trained["parents"],
        "num_levels": num_levels})
    level_info = _level_info(ds.root, stage.shards, trained, mem) if not result.failed else []
    result = stage.finish(result, summary=False, levels=level_info, warnings=trained["warnings"], dim=emb.dim,
                          sampled=trained["points"], clustered_points=n_ok)
    result.warnings = list(trained["warnings"])
    warning = mismatch_warning(result.totals, ds.root)
    if warning:
        result.warnings.append(warning)
    for w in result.warnings:
        print(f"warning: {w}")
    if summary:
        _print(result, ds.root)
    return result


def _level_info(root: str, shards: list[int], trained: dict, memory: int) -> list[dict[str, Any]]:
    ks = [int(c.shape[0]) for c in trained["centroids"]]
    total = [np.zeros(k, np.int64) for k in ks]

    def take(_: int, sizes: list) -> None:
        for t, s in enumerate(sizes):
            total[t] += s

    map_tasks(sizes_task, shards, kwargs={"root": root, "ks": ks}, desc="cluster sizes", memory=memory,
              on_result=take)
    out = []
    for t, (lv, sizes) in enumerate(zip(trained["levels"], total), start=1):
        nz = sizes[sizes > 0]
        out.append({"level": t, **lv, "k": ks[t - 1], "non_empty": int(nz.size),
                    "min": int(nz.min()) if nz.size else 0, "median": float(np.median(nz)) if nz.size else 0.0,
                    "max": int(nz.max()) if nz.size else 0})
    return out


def _print(result: StageResult, root: str) -> None:
    from webcurate.shards.progress import print_table

    rows = [(f"level {i['level']}", f"{i['k_requested']} -> {i['k']}", i["non_empty"], i["min"], i["median"],
             i["max"], i["resampling_steps"], i["method"]) for i in result.info.get("levels", [])]
    print_table(f"clusters: {root}", rows,
                ("level", "k asked -> used", "non-empty", "min", "median", "max", "resampling", "method"))
    print_table("clusters: points", [(k, v) for k, v in result.totals.items()] +
                [("seconds", f"{result.seconds:.1f}")], ("what", "count"))


def read_clusters(ds: Dataset):
    """The whole ``clusters`` sidecar (all parts), erroring clearly when missing."""
    from webcurate.shards.global_stage import require_complete

    require_complete(ds, STAGE, "cluster")
    return ds.read_sidecar(STAGE)


def level_columns(table) -> list[str]:
    """``level_1`` .. ``level_L`` columns of a clusters table (or its schema), finest first."""
    names = table.column_names if hasattr(table, "column_names") else table.names
    cols = [c for c in names if c.startswith("level_") and c[6:].isdigit()]
    return sorted(cols, key=lambda c: int(c[6:]))
