"""Write a new dataset holding a selected subset of another one.

Shared by curation export and pseudo-label export. Image bytes are copied,
never re-encoded; each selected sample's json and index row gain the extra
fields given for it; the new manifest names its parent. One Ray task per
source shard, so output shard N holds the selected samples of source shard N
(an empty selection gives an empty shard, keeping numbering aligned).
"""
from __future__ import annotations

import json
import time
from typing import Any


from . import manifest as manifest_mod, storage
from .dataset import Dataset, DatasetError
from .progress import print_summary
from .schema import CORE_COLUMNS, STATUS_OK
from .stage import raise_if_failed, run_shards
from .writer import ShardWriter

# Fields that only make sense in the source's index; not copied into json.
_DROP_FROM_JSON = {"status", "error", "duplicate_of"}


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except TypeError:
        if hasattr(v, "tolist"):
            return v.tolist()
        return str(v)


def subset_shard(shard: int, *, src_root: str, dst_root: str, selected: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Copy the selected ok samples of one source shard into ``dst_root``."""
    t0 = time.time()
    src = Dataset(src_root)
    index = {r["key"]: r for r in src.read_index(shard).to_pylist()}
    wanted = {k for k, r in index.items() if k in selected and r.get("status") == STATUS_OK}
    extra_names = sorted({f for k in wanted for f in selected[k]} - set(CORE_COLUMNS))
    writer = ShardWriter(dst_root, shard)
    try:
        if wanted:
            for s in src.iter_samples(shard, keys=wanted):
                row = {k: v for k, v in index[s.key].items() if k not in _DROP_FROM_JSON}
                row["shard"] = shard
                extra = {k: _jsonable(v) for k, v in selected[s.key].items()}
                row.update(extra)
                for name in extra_names:
                    row.setdefault(name, None)
                caption = s.caption if s.caption is not None else row.get("caption")
                writer.add(s.key, s.image, s.ext, row, caption=caption)
        # Extra fields go to the index too, as JSON text when not scalar.
        for r in writer.rows:
            for name in extra_names:
                v = r.get(name)
                if isinstance(v, (list, dict)):
                    r[name] = json.dumps(v)
        stats = writer.commit()
    finally:
        writer.cleanup()
    stats["counts"]["missing"] = len(wanted) - stats["counts"].get(STATUS_OK, 0)
    stats["seconds"] = round(time.time() - t0, 3)
    return stats


def write_subset(
    src_root: str,
    dst_root: str,
    selected: dict[str, dict[str, Any]],
    *,
    stage: str,
    parameters: dict[str, Any],
    workers: int | None = None,
    summary: bool = True,
) -> dict[str, Any]:
    """Copy samples whose key is in ``selected`` into a new dataset at ``dst_root``.

    ``selected`` maps key -> extra fields merged into that sample's json and
    index row. Returns the new dataset's manifest. Resumable per shard; a
    destination holding another stage's dataset is refused.
    """
    src = Dataset(src_root)
    shards = src.completed_shards()
    if not shards:
        raise DatasetError(f"{src_root} has no completed shards to export from")
    if storage.is_s3(dst_root) == storage.is_s3(src_root) and dst_root.rstrip("/") == src_root.rstrip("/"):
        raise DatasetError("export output must differ from its input dataset")
    params = manifest_mod.normalize(dict(parameters, selected=len(selected)))
    existing = manifest_mod.load(dst_root)
    if existing is not None and (existing.get("stage") != stage or existing.get("parent") != src_root
                                 or existing.get("parameters") != params):
        raise DatasetError(
            f"{dst_root} already holds another dataset (stage {existing.get('stage')}, parent "
            f"{existing.get('parent')}); choose a new --output"
        )
    if existing is None:
        manifest_mod.save(dst_root, manifest_mod.new(stage, params, parent=src_root, num_shards=max(shards) + 1))
    dst = Dataset(dst_root)
    done = set(dst.completed_shards())
    # Ship each shard only its own selection (keys are per-shard in the source index).
    result = run_shards(
        subset_shard, shards,
        kwargs={"src_root": src_root, "dst_root": dst_root, "selected": selected},
        done=done, on_done=lambda s, st: manifest_mod.record_shard(dst_root, s, st),
        desc=stage, workers=workers,
    )
    # Shards the source never completed are empty but must exist for readers.
    for s in range(max(shards) + 1):
        if s not in shards and s not in done and s not in result.done:
            st = subset_shard_empty(s, dst_root)
            manifest_mod.record_shard(dst_root, s, st)
    if summary:
        print_summary(result, title=f"{stage}: {src_root} -> {dst_root}", rate_key="ok")
    raise_if_failed(result)
    return manifest_mod.load(dst_root) or {}


def subset_shard_empty(shard: int, dst_root: str) -> dict[str, Any]:
    w = ShardWriter(dst_root, shard)
    try:
        return w.commit()
    finally:
        w.cleanup()
