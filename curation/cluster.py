"""`webcurate cluster`: hierarchical k-means over a dataset's embeddings.

Reads the ``embeddings`` sidecar, keeps the latest selection made so far
(``--subset auto``: the retrieved samples when a ``retrieve`` sidecar
exists, else the ``dedup`` survivors, else everything), runs hierarchical
k-means with resampling (``kmeans.hierarchical_kmeans``) and writes:

- ``<root>/clusters/part-<shard>.parquet``: one row per embedded key with
  ``status`` (``ok`` = clustered; ``duplicate`` when dedup removed it;
  ``not_retrieved`` when clustering the retrieved subset), ``level_1`` ..
  ``level_L`` (int32 cluster ids, -1 when not clustered) and ``distance``
  (float32 L2 distance to the level-1 centroid, NaN when not clustered);
- ``<root>/clusters/centroids_level_<t>.npy``: (k_t, D) float32 centroids;
- ``<root>/clusters/parents_level_<t>.npy``: (k_t,) int32, the level-(t+1)
  cluster of each level-t centroid (t < L).

The stage is recorded in the manifest like any other; re-running with the
same parameters on unchanged inputs skips; a change of parameters, of the
embeddings or of the dedup/retrieve selection recomputes. Embeddings with
NaN, or missing for some shards, are refused with the keys/shards named.
"""
from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from webcurate.shards import storage
from webcurate.shards.dataset import Dataset, DatasetError

from . import global_stage
from .kmeans import Hierarchy, hierarchical_kmeans

STAGE = "clusters"
EMBEDDINGS = "embeddings"
DEDUP = "dedup"

RETRIEVE = "retrieve"
SUBSETS = ("auto", "all", DEDUP, RETRIEVE)

STATUS_OK = "ok"
STATUS_DUPLICATE = "duplicate"
STATUS_NOT_RETRIEVED = "not_retrieved"


@dataclass
class Points:
    """The vectors a stage works on, with where each came from.

    keys: N embedded sample keys; shards: (N,) int32 shard of each key;
    status: (N,) per-key outcome (ok / duplicate / not_retrieved); X: (M, D)
    float32 L2-normalised embeddings of the ``ok`` keys only, in key order;
    subset: which selection was clustered (all / dedup / retrieve).
    """

    keys: list[str]
    shards: np.ndarray
    status: np.ndarray
    X: np.ndarray
    dim: int
    subset: str = "all"
    fingerprint: dict | None = None

    @property
    def ok(self) -> np.ndarray:
        return self.status == STATUS_OK


def _removed_by(ds: Dataset, stage: str, column: str) -> set[str]:
    """Keys whose boolean ``column`` in sidecar ``stage`` is false."""
    table = ds.read_sidecar(stage, columns=["key", column])
    return {k for k, v in zip(table["key"].to_pylist(), table[column].to_pylist()) if not v}


def resolve_subset(ds: Dataset, subset: str) -> str:
    """Which keys to cluster: ``auto`` -> retrieve (when complete), else dedup, else all."""
    from webcurate.shards.errors import ConfigError

    if subset not in SUBSETS:
        raise ConfigError(f"--subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    if subset != "auto":
        if subset != "all":
            global_stage.require_complete(ds, subset, "dedup" if subset == DEDUP else "retrieve")
        return subset
    for stage in (RETRIEVE, DEDUP):
        if ds.sidecar_completed(stage):
            global_stage.require_complete(ds, stage, "dedup" if stage == DEDUP else "retrieve")
            return stage
    return "all"


def load_points(ds: Dataset, *, subset: str = "auto") -> Points:
    """The embeddings to cluster, with each embedded key's outcome.

    ``subset``: ``all`` embedded samples; ``dedup`` survivors; ``retrieve``d
    samples (which retrieval already took from dedup survivors); ``auto``
    picks the narrowest that exists. Raises a DatasetError naming the problem
    when embeddings are missing, partial or hold NaN, or when the chosen
    sidecar is partial.
    """
    from .vectors import read_embeddings

    chosen = resolve_subset(ds, subset)
    emb = read_embeddings(ds.root)
    keys = list(emb.keys)
    status = np.full(len(keys), STATUS_OK, dtype=object)
    if chosen == DEDUP:
        removed = _removed_by(ds, DEDUP, "keep")
        status[np.fromiter((k in removed for k in keys), dtype=bool, count=len(keys))] = STATUS_DUPLICATE
    elif chosen == RETRIEVE:
        dropped = _removed_by(ds, RETRIEVE, "selected")
        status[np.fromiter((k in dropped for k in keys), dtype=bool, count=len(keys))] = STATUS_NOT_RETRIEVED
    ok = status == STATUS_OK
    return Points(keys=keys, shards=np.asarray(emb.shards, dtype=np.int32), status=status,
                  X=np.ascontiguousarray(emb.vectors[ok]), dim=emb.dim, subset=chosen,
                  fingerprint=emb.fingerprint())


def parse_levels(text: str | Sequence[int]) -> list[int]:
    """``"10000,1000,100"`` -> ``[10000, 1000, 100]`` (finest first, each >= 1)."""
    from webcurate.shards.errors import ConfigError

    if isinstance(text, str):
        try:
            vals = [int(x) for x in text.replace(" ", "").split(",") if x]
        except ValueError as e:
            raise ConfigError(f"--levels must be comma-separated integers like 10000,1000,100, got {text!r}") from e
    else:
        vals = [int(x) for x in text]
    if not vals or any(v < 1 for v in vals):
        raise ConfigError(f"--levels must be positive integers, finest first (e.g. 10000,1000,100), got {text!r}")
    return vals


def parse_int_list(text: str | int | Sequence[int] | None, name: str) -> int | list[int] | None:
    """``None``/``"auto"`` -> None, ``"5"`` -> 5, ``"0,10,10"`` -> [0, 10, 10]."""
    from webcurate.shards.errors import ConfigError

    if text is None or text == "auto":
        return None
    if isinstance(text, int):
        return text
    if isinstance(text, (list, tuple)):
        return [int(x) for x in text]
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"{name} must be an integer or a comma-separated list, got {text!r}") from e
    return vals[0] if len(vals) == 1 else vals


def _upstream(ds: Dataset, subset: str) -> dict[str, Any]:
    """What the clustering depends on, so a change upstream invalidates it."""
    stages = ds.manifest.get("stages", {})
    up = {EMBEDDINGS: (stages.get(EMBEDDINGS) or {}).get("parameters")}
    if subset in (DEDUP, RETRIEVE):
        up[subset] = (stages.get(subset) or {}).get("parameters")
    return up


def cluster_parameters(ds: Dataset, *, levels: list[int], resampling_steps: int | list[int],
                       sample_size: int | list[int] | None, sample_strategy: str, niter: int, seed: int,
                       method: str, subset: str) -> dict[str, Any]:
    """The stage parameters recorded in the manifest (``subset`` already resolved)."""
    return {
        "levels": list(levels), "resampling_steps": resampling_steps, "sample_size": sample_size,
        "resample_strategy": sample_strategy, "niter": niter, "seed": seed, "method": method,
        "subset": subset, "upstream": _upstream(ds, subset),
    }


def _save_npy(uri: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    storage.write_bytes(uri, buf.getvalue())


def load_centroids(root: str, level: int) -> np.ndarray:
    """(k_t, D) float32 centroids of level ``level`` (1-based) saved by the cluster stage."""
    data = storage.read_bytes(storage.join(root, STAGE, f"centroids_level_{level}.npy"))
    return np.load(io.BytesIO(data), allow_pickle=False)


def part_tables(points: Points, hier: Hierarchy | None, num_levels: int,
                shards: list[int]) -> tuple[dict[int, pa.Table], dict[int, dict]]:
    """Per-shard sidecar tables and stats from the clustering result (an empty
    table for a shard without embedded keys, so every shard has its part)."""
    n = len(points.keys)
    labels = np.full((n, num_levels), -1, dtype=np.int32)
    dist = np.full(n, np.nan, dtype=np.float32)
    ok = points.ok
    if hier is not None and hier.levels:
        labels[ok] = hier.labels()
        dist[ok] = hier.distance
    keys = np.asarray(points.keys, dtype=object)
    order = np.argsort(points.shards, kind="stable")
    sh_sorted = points.shards[order]
    parts: dict[int, pa.Table] = {}
    stats: dict[int, dict] = {}
    for s in shards:
        idx = order[np.searchsorted(sh_sorted, s, "left"):np.searchsorted(sh_sorted, s, "right")]
        cols: dict[str, Any] = {
            "key": pa.array(keys[idx].tolist(), pa.string()),
            "status": pa.array(points.status[idx].tolist(), pa.string()),
        }
        for t in range(num_levels):
            cols[f"level_{t + 1}"] = pa.array(labels[idx, t], pa.int32())
        cols["distance"] = pa.array(dist[idx], pa.float32())
        parts[int(s)] = pa.table(cols)
        st = points.status[idx]
        stats[int(s)] = {"counts": {"total": int(len(idx)), "clustered": int((st == STATUS_OK).sum()),
                                    "duplicate": int((st == STATUS_DUPLICATE).sum()),
                                    "not_retrieved": int((st == STATUS_NOT_RETRIEVED).sum())}}
    return parts, stats


def run_cluster(
    input: str,
    *,
    levels: str | Sequence[int] = (10000, 1000, 100),
    resampling_steps: int | str | Sequence[int] = 10,
    sample_size: int | str | Sequence[int] | None = None,
    sample_strategy: str = "closest",
    niter: int = 20,
    seed: int = 0,
    method: str = "auto",
    subset: str = "auto",
    summary: bool = True,
) -> dict[str, Any]:
    """Cluster the dataset at ``input`` and write the ``clusters`` sidecar.

    Returns a summary dict: ``skipped`` (already complete), ``levels`` (per
    level: requested k, used k, non-empty clusters, min/median/max size),
    ``counts`` and ``warnings`` (e.g. k clamped because it exceeded N).
    """
    from webcurate.shards.progress import print_table
    from webcurate.shards.stage import raise_if_failed

    t0 = time.time()
    ds = Dataset(input)
    lv = parse_levels(levels)
    steps = parse_int_list(resampling_steps, "--resampling-steps")
    steps = 10 if steps is None else steps
    sizes = parse_int_list(sample_size, "--sample-size")
    params = cluster_parameters(ds, levels=lv, resampling_steps=steps, sample_size=sizes,
                                sample_strategy=sample_strategy, niter=niter, seed=seed, method=method,
                                subset=resolve_subset(ds, subset))
    emb_shards = global_stage.require_complete(ds, EMBEDDINGS, "embed")
    if global_stage.is_complete(ds, STAGE, emb_shards, params):
        entry = global_stage.stage_entry(ds, STAGE)
        out = {"skipped": True, "levels": entry.get("level_info", []), "counts": entry.get("counts", {}),
               "warnings": entry.get("warnings", []), "seconds": round(time.time() - t0, 2)}
        if summary:
            print(f"clusters of {ds.root} are complete with these parameters; nothing to do")
        return out
    points = load_points(ds, subset=params["subset"])
    n_ok = int(points.ok.sum())
    if n_ok == 0:
        raise DatasetError(f"{ds.root} has no embeddings left to cluster ({len(points.keys)} embedded, "
                           f"none in the `{points.subset}` selection)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # they are collected in hier.warnings and printed below
        hier = hierarchical_kmeans(points.X, lv, resampling_steps=steps, sample_sizes=sizes,
                                   sample_strategy=sample_strategy, niter=niter, seed=seed, method=method,
                                   progress=summary)
    for t, level in enumerate(hier.levels, start=1):
        _save_npy(storage.join(ds.root, STAGE, f"centroids_level_{t}.npy"), level.centroids)
        if t < len(hier.levels):
            _save_npy(storage.join(ds.root, STAGE, f"parents_level_{t}.npy"), hier.parents(t))
    labels = hier.labels()
    level_info = []
    for t, level in enumerate(hier.levels):
        sizes_t = np.bincount(labels[:, t], minlength=level.k)
        nz = sizes_t[sizes_t > 0]
        level_info.append({"level": t + 1, "k_requested": level.requested_k, "k": level.k,
                           "non_empty": int(nz.size), "min": int(nz.min()), "median": float(np.median(nz)),
                           "max": int(nz.max()), "resampling_steps": level.resampling_steps,
                           "sample_size": level.sample_size, "method": level.method})
    parts, stats = part_tables(points, hier, len(lv), emb_shards)
    result = global_stage.write_parts(
        ds, STAGE, params, parts, stats, desc="clusters parts",
        level_info=level_info, warnings=hier.warnings, dim=points.dim,
    )
    counts = global_stage.stage_entry(ds, STAGE).get("counts", result.counts)
    for w in hier.warnings:
        print(f"warning: {w}")
    if summary:
        rows = [(f"level {i['level']}", f"{i['k_requested']} -> {i['k']}", i["non_empty"], i["min"],
                 i["median"], i["max"], i["resampling_steps"], i["method"]) for i in level_info]
        print_table(f"clusters: {ds.root}", rows,
                    ("level", "k asked -> used", "non-empty", "min", "median", "max", "resampling", "method"))
        print_table("clusters: points", [(k, v) for k, v in counts.items()] +
                    [("seconds", f"{time.time() - t0:.1f}")], ("what", "count"))
    raise_if_failed(result)
    return {"skipped": False, "levels": level_info, "counts": counts, "warnings": hier.warnings,
            "seconds": round(time.time() - t0, 2)}


def read_clusters(ds: Dataset) -> pa.Table:
    """The whole ``clusters`` sidecar (all parts), erroring clearly when missing."""
    global_stage.require_complete(ds, STAGE, "cluster")
    return ds.read_sidecar(STAGE)


def level_columns(table: pa.Table) -> list[str]:
    """``level_1`` .. ``level_L`` columns of a clusters table, finest first."""
    cols = [c for c in table.column_names if c.startswith("level_") and c[6:].isdigit()]
    return sorted(cols, key=lambda c: int(c[6:]))
