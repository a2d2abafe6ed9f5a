"""Stages computed once over the whole dataset, stored as per-shard sidecar parts.

Clustering and balanced sampling need every embedding at once, so they do not
fit the per-shard task model of ``run_sidecar_stage``. They compute in one
process (faiss uses every core there) and then write their result with the
same contract as every other stage: ``<root>/<stage>/part-<shard>.parquet``
keyed by ``key``, each part written atomically and recorded in the manifest
as it lands, so readers (export, report, other stages) see the usual layout.
Because the computation is deterministic given its parameters and seed, a run
killed while writing resumes by recomputing and writing only missing parts.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import pyarrow as pa

from webcurate.shards.progress import progress_bar
from webcurate.shards.stage import StageResult
from webcurate.shards import manifest as manifest_mod
from webcurate.shards.dataset import Dataset, DatasetError

# Parallel uploads of parts (I/O bound; S3 latency dominates).
WRITE_THREADS = 8


def stage_entry(ds: Dataset, stage: str) -> dict[str, Any]:
    """The manifest entry of sidecar ``stage`` (empty when the stage never ran)."""
    return dict(ds.reload().manifest.get("stages", {}).get(stage, {}))


def is_complete(ds: Dataset, stage: str, shards: list[int] | None = None,
                parameters: dict[str, Any] | None = None) -> bool:
    """True when every shard in ``shards`` (default: all completed dataset shards)
    has its ``stage`` part, and the stage ran with ``parameters`` (when given)."""
    entry = stage_entry(ds, stage)
    if not entry:
        return False
    if parameters is not None and entry.get("parameters") != manifest_mod.normalize(parameters):
        return False
    want = set(ds.completed_shards() if shards is None else shards)
    return want <= set(ds.sidecar_completed(stage))


def require_complete(ds: Dataset, stage: str, command: str, shards: list[int] | None = None) -> list[int]:
    """The shards of sidecar ``stage``; a clear error when it is missing or partial."""
    want = set(ds.completed_shards() if shards is None else shards)
    have = set(ds.sidecar_completed(stage))
    if not have:
        raise DatasetError(f"{ds.root} has no `{stage}` table yet; run `webcurate {command} --input {ds.root}` first")
    missing = sorted(want - have)
    if missing:
        raise DatasetError(
            f"`{stage}` of {ds.root} covers {len(want) - len(missing)} of {len(want)} shards "
            f"(missing e.g. shard {missing[0]:05d}); re-run `webcurate {command} --input {ds.root}` to finish it"
        )
    return sorted(want)


def write_parts(ds: Dataset, stage: str, parameters: dict[str, Any], parts: dict[int, pa.Table],
                stats: dict[int, dict[str, Any]], *, desc: str | None = None, **info: Any) -> StageResult:
    """Write and record the per-shard parts of a global stage.

    Records ``stage`` with ``parameters`` (a change restarts completion), skips
    parts already complete under the same parameters, uploads the others in
    parallel and records each in the manifest as it lands (driver thread
    only, so manifest updates never race). ``info`` goes into the stage entry.
    """
    t0 = time.time()
    manifest_mod.record_stage(ds.root, stage, parameters, **info)
    done = set(ds.reload().sidecar_completed(stage))
    todo = [s for s in sorted(parts) if s not in done]
    result = StageResult(stage=stage, skipped=sorted(set(parts) & done))
    bar = progress_bar(total=len(parts), initial=len(result.skipped), desc=desc or f"{stage} parts", unit="part")
    try:
        with ThreadPoolExecutor(max_workers=WRITE_THREADS) as pool:
            futures = {pool.submit(ds.write_sidecar, stage, s, parts[s]): s for s in todo}
            for fut in as_completed(futures):
                s = futures[fut]
                try:
                    fut.result()
                except Exception as e:  # keep the finished parts; report the rest
                    result.failed[s] = f"{type(e).__name__}: {e}"[:500]
                else:
                    manifest_mod.record_shard(ds.root, s, stats.get(s, {"counts": {}}), stage=stage)
                    result.done[s] = stats.get(s, {"counts": {}})
                bar.update(1)
    finally:
        bar.close()
    manifest_mod.record_stage(ds.root, stage, parameters, finished=manifest_mod.now_iso())
    ds.reload()
    result.seconds = time.time() - t0
    return result
