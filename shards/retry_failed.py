"""`webcurate shard --retry-failed [REASONS]`: re-fetch failed rows inside completed shards.

Each shard holding a failed row whose reason matches is rewritten by one Ray
task, atomically (tar first, then index, each by temp name and rename): the
retried rows keep their keys and get their new outcome; every other row stays
exactly as it was, and its tar members are copied byte for byte. Image
options come from the dataset's own record, so a recovered sample is made the
way its neighbours were. A recovered sample whose pixels another sample
already has becomes a duplicate of it (never the other way round: no other
row changes). The manifest lists every retry under ``retries``.
"""
from __future__ import annotations

import io
import time
from typing import Any

import pyarrow as pa

from . import layout, manifest as manifest_mod, storage
from .dataset import Dataset
from .download import FetchOptions
from .errors import DatasetError
from .image_ops import ImageOptions
from .ingest import fetch_and_process, mark_cross_shard_duplicates, task_fetch_options, write_result
from .progress import print_summary
from .ray_runtime import cluster_cpus, init_ray
from .schema import CORE_COLUMNS, STATUS_DUPLICATE, STATUS_FAILED, STATUS_OK
from .stage import raise_if_failed, run_shards
from .tar_samples import TarBroken, iter_tar
from .writer import ShardWriter, write_parquet

DEFAULT_REASONS = ("timeout", "connection_error", "http_5xx", "http_429")
_MEASURED = ("width", "height", "original_width", "original_height", "sha256", "ext", "bytes", "status", "error",
             "duplicate_of")


def matches(error: str | None, reasons: tuple[str, ...]) -> bool:
    """Whether a failed row's error has one of ``reasons`` (``http_5xx`` covers http_500..599; ``all``: any)."""
    reason = (error or "").split(":", 1)[0].strip()
    for want in reasons:
        if want == "all" or want == reason:
            return True
        if want.endswith("xx") and reason.startswith(want[:-2]) and reason[len(want) - 2:].isdigit():
            return True
    return False


def parse_reasons(text: str | None) -> tuple[str, ...]:
    return tuple(r.strip() for r in (text or ",".join(DEFAULT_REASONS)).split(",") if r.strip())


def retry_shard(shard: int, *, root: str, keys: list[str], base: str | None, image_opts: ImageOptions,
                fetch_opts: FetchOptions, threads: int) -> dict[str, Any]:
    """Rewrite shard ``shard`` with the rows ``keys`` fetched again; everything else copied as it is."""
    t0 = time.time()
    index = storage.read_parquet(layout.index_uri(root, shard))
    rows = index.to_pylist()
    members: dict[str, dict[str, bytes]] = {}
    for s in iter_tar(io.BytesIO(storage.read_bytes(layout.shard_uri(root, shard))), max_member_bytes=1 << 40):
        if isinstance(s, TarBroken):
            raise DatasetError(f"shard {shard:05d} of {root} is not a readable tar: {s.error}")
        members[s.key] = s.files
    wanted = set(keys)
    todo = [r for r in rows if r["key"] in wanted]
    results, fetch_stats = fetch_and_process([{"source": r["source"]} for r in todo], base, image_opts,
                                             fetch_opts, threads)
    outcome = {r["key"]: res for r, res in zip(todo, results)}
    extra = pa.schema([f for f in index.schema if f.name not in CORE_COLUMNS])
    writer = ShardWriter(root, shard, extra_schema=extra)
    try:
        for r in rows:
            if r["key"] in outcome:
                img, err = outcome[r["key"]]
                meta = {k: v for k, v in r.items() if k not in _MEASURED and k != "key"}
                write_result(writer, r["key"], meta, img, err, None)
            else:
                writer.add_verbatim(r, members.get(r["key"]))
        stats = writer.commit()
    finally:
        writer.cleanup()
    recovered = sum(1 for img, err in outcome.values() if err is None)
    stats.update(fetch=fetch_stats, retried=len(todo), recovered=recovered, seconds=round(time.time() - t0, 3))
    return stats


def _mark_recovered_duplicates(root: str, recovered: set[str]) -> int:
    """A recovered sample with pixels some other sample has becomes that sample's duplicate
    (recovered ones among themselves: the first in shard order stays)."""
    ds = Dataset(root)
    first: dict[str, str] = {}
    indices = {s: ds.read_index(s) for s in ds.completed_shards()}
    tables = {s: t.to_pylist() for s, t in indices.items()}
    for rows in tables.values():
        for r in rows:
            if r["status"] in (STATUS_OK, STATUS_DUPLICATE) and r["sha256"] and r["key"] not in recovered:
                first.setdefault(r["sha256"], r["duplicate_of"] or r["key"])
    marked = 0
    for shard, rows in tables.items():
        changed = False
        for r in rows:
            if r["key"] in recovered and r["status"] == STATUS_OK:
                k0 = first.setdefault(r["sha256"], r["key"])
                if k0 != r["key"]:
                    r.update(status=STATUS_DUPLICATE, duplicate_of=k0, error=f"duplicate: same pixels as {k0}")
                    changed, marked = True, marked + 1
        if changed:
            write_parquet(layout.index_uri(root, shard), pa.Table.from_pylist(rows, schema=indices[shard].schema))
    return marked


def retry_failed(output: str, reasons: tuple[str, ...], *, workers: int | None = None, threads: int = 16,
                 fetch_opts: FetchOptions = FetchOptions(), max_task_pixels: int | None = None,
                 summary: bool = True) -> dict[str, Any]:
    """Re-fetch the failed rows of ``output`` whose reason is in ``reasons``; returns the retry's record."""
    ds = Dataset(output)
    m = ds.manifest
    if m.get("stage") != "shard":
        raise DatasetError(f"{output} was made by `{m.get('stage')}`, not `webcurate shard`: nothing to retry")
    params = m.get("parameters") or {}
    image = dict(params.get("image") or {})
    if max_task_pixels:
        image["max_task_pixels"] = max_task_pixels
    image_opts = ImageOptions(**image)
    base = params.get("input") if params.get("kind") == "folder" else None
    todo: dict[int, dict[str, Any]] = {}
    for shard in ds.completed_shards():
        idx = ds.read_index(shard, columns=["key", "status", "error"]).to_pylist()
        keys = [r["key"] for r in idx if r["status"] == STATUS_FAILED and matches(r["error"], reasons)]
        if keys:
            todo[shard] = {"keys": keys}
    init_ray()
    in_flight = max(1, min(workers or int(cluster_cpus()), len(todo) or 1))
    retried: dict[int, dict[str, Any]] = {}

    def on_done(shard: int, stats: dict[str, Any]) -> None:
        manifest_mod.record_shard(output, shard, stats)
        retried[shard] = stats

    result = run_shards(retry_shard, sorted(todo), per_shard=todo, desc="retry-failed", workers=workers,
                        kwargs=dict(root=output, base=base, image_opts=image_opts, threads=threads,
                                    fetch_opts=task_fetch_options(fetch_opts, in_flight)),
                        on_done=on_done)
    recovered = {k for s, st in retried.items() for k in todo[s]["keys"]}
    dups = 0
    if retried and params.get("dedup", True):
        dups = _mark_recovered_duplicates(output, recovered)
        mark_cross_shard_duplicates(output)  # recounts the manifest from the indices; changes no other row
    elif retried:
        manifest_mod.summarize(output)
    record = {"time": manifest_mod.now_iso(), "reasons": list(reasons), "shards": sorted(retried),
              "retried": sum(st.get("retried", 0) for st in retried.values()),
              "recovered": sum(st.get("recovered", 0) for st in retried.values()), "duplicates": dups,
              "failed_shards": sorted(result.failed)}
    m = manifest_mod.load(output) or {}
    m.setdefault("retries", []).append(record)
    manifest_mod.save(output, m)
    if summary:
        print_summary(result, title=f"retry-failed ({', '.join(reasons)}) -> {output}")
    raise_if_failed(result)
    return record
