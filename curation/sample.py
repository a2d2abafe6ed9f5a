"""`webcurate sample`: balanced sampling of a clustered dataset to a target size.

Reads the ``clusters`` sidecar, water-fills ``target`` over the hierarchy
(``sampling.balanced_sample``) among the keys that were clustered, and writes
``<root>/sample/part-<shard>.parquet`` with ``key`` and ``selected`` (bool)
for every key of the clusters table (keys that were not clustered, e.g.
dedup-removed ones, are ``selected = False``).
"""
from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import pyarrow as pa

from webcurate.shards.dataset import Dataset, DatasetError

from . import global_stage
from .cluster import STAGE as CLUSTERS, STATUS_OK, level_columns
from .sampling import SamplingError, balanced_sample, size_entropy

STAGE = "sample"


def run_sample(input: str, target: int, *, strategy: str = "random", seed: int = 0,
               min_score: list[str] | None = None, weight_by: str | None = None,
               summary: bool = True) -> dict[str, Any]:
    """Select ``target`` keys balanced over the clusters and write the ``sample`` sidecar.

    ``min_score`` (``NAME=VALUE`` items) leaves out samples whose
    ``webcurate score`` is below VALUE; ``weight_by`` NAME draws within each
    cluster with probability growing with that score instead of ``strategy``.

    Returns ``{"skipped", "selected", "clustered", "target", "entropy_before",
    "entropy_after", "warnings", "seconds"}``; entropies are of level-1
    cluster sizes (nats) over all clustered keys and over the selection.
    """
    from webcurate.shards.progress import print_table
    from webcurate.shards.stage import raise_if_failed

    t0 = time.time()
    if target is None or int(target) < 1:
        raise SamplingError(f"--target must be a positive number of samples, got {target}")
    target = int(target)
    ds = Dataset(input)
    shards = global_stage.require_complete(ds, CLUSTERS, "cluster")
    entry = global_stage.stage_entry(ds, CLUSTERS)
    params = {"target": target, "strategy": strategy, "seed": seed,
              "upstream": {CLUSTERS: entry.get("parameters")}}
    if min_score or weight_by:  # recorded only when used: older runs keep their parameters
        from .score import score_runs

        params.update(min_score=sorted(min_score or []), weight_by=weight_by)
        params["upstream"].update(score_runs(ds, min_score, weight_by))
    if global_stage.is_complete(ds, STAGE, shards, params):
        st = global_stage.stage_entry(ds, STAGE)
        if summary:
            print(f"sample of {ds.root} is complete with these parameters; nothing to do")
        return {"skipped": True, **st.get("result", {}), "seconds": round(time.time() - t0, 2)}
    parts_in = {s: ds.read_sidecar_part(CLUSTERS, s) for s in shards}
    table = pa.concat_tables(list(parts_in.values()), promote_options="permissive")
    lvl = level_columns(table)
    if not lvl:
        raise DatasetError(f"the clusters table of {ds.root} has no level_* columns; re-run `webcurate cluster`")
    ok = np.asarray(table["status"].to_pylist(), dtype=object) == STATUS_OK
    prio = None
    if min_score or weight_by:
        from .score import score_selection

        ok, prio = score_selection(ds, table["key"].to_pylist(), ok, min_score, weight_by, seed)
    labels = np.stack([table[c].to_numpy(zero_copy_only=False) for c in lvl], axis=1)[ok]
    distance = table["distance"].to_numpy(zero_copy_only=False)[ok]
    n_ok = int(ok.sum())
    warns: list[str] = []
    if target > n_ok:
        warns.append(f"target {target} is larger than the {n_ok} clustered samples; selecting all of them")
    if prio is not None:  # score-weighted: the priority takes the place of the distance
        mask_ok = balanced_sample(labels, min(target, n_ok), distance=prio, strategy="closest", seed=seed)
    else:
        mask_ok = balanced_sample(labels, min(target, n_ok), distance=distance, strategy=strategy, seed=seed)
    selected = np.zeros(table.num_rows, dtype=bool)
    selected[np.flatnonzero(ok)[mask_ok]] = True
    parts: dict[int, pa.Table] = {}
    stats: dict[int, dict] = {}
    start = 0
    for s in shards:
        n = parts_in[s].num_rows
        sel = selected[start:start + n]
        parts[s] = pa.table({"key": parts_in[s]["key"], "selected": pa.array(sel, pa.bool_())})
        stats[s] = {"counts": {"total": int(n), "selected": int(sel.sum())}}
        start += n
    result_info = {
        "selected": int(selected.sum()), "clustered": n_ok, "target": target,
        "entropy_before": size_entropy(labels[:, 0]) if n_ok else 0.0,
        "entropy_after": size_entropy(labels[mask_ok, 0]) if mask_ok.any() else 0.0,
        "warnings": warns,
    }
    result = global_stage.write_parts(ds, STAGE, params, parts, stats, desc="sample parts", result=result_info)
    for w in warns:
        warnings.warn(w, stacklevel=2)
        print(f"warning: {w}")
    if summary:
        top = lvl[-1]
        top_all = table[top].to_numpy(zero_copy_only=False)[ok]
        rows = [("clustered samples", n_ok), ("target", target), ("selected", result_info["selected"]),
                ("level-1 clusters represented", int(np.unique(labels[mask_ok, 0]).size)),
                ("level-1 size entropy before -> after",
                 f"{result_info['entropy_before']:.3f} -> {result_info['entropy_after']:.3f}"),
                (f"{top} size entropy before -> after",
                 f"{size_entropy(top_all):.3f} -> {size_entropy(top_all[mask_ok]) if mask_ok.any() else 0.0:.3f}"),
                ("seconds", f"{time.time() - t0:.1f}")]
        print_table(f"sample ({strategy}): {ds.root}", rows, ("what", "value"))
    raise_if_failed(result)
    return {"skipped": False, **result_info, "seconds": round(time.time() - t0, 2)}


def selected_keys(ds: Dataset) -> list[str]:
    """Keys the ``sample`` sidecar selected."""
    t = ds.read_sidecar(STAGE, columns=["key", "selected"])
    return [k for k, s in zip(t["key"].to_pylist(), t["selected"].to_pylist()) if s]
