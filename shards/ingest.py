"""`webcurate shard`: inputs -> WebDataset shards + index + manifest, on Ray.

Inputs are split into contiguous blocks of ``shard_size`` in input order, so
input row i always lands in shard i // shard_size; one Ray task writes one
shard (threads inside fetch and decode). Shards already complete are skipped,
so a killed run re-run with the same command finishes the rest and gives the
same bytes.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from . import layout, manifest as manifest_mod, storage
from .adopt import adopt
from .dataset import Dataset
from .progress import print_summary
from .ray_runtime import cluster_cpus, init_ray
from .stage import raise_if_failed, run_shards
from .errors import DatasetError
from .download import Downloader, FetchFailed, FetchOptions
from .image_ops import ImageOptions, ImageRejected, PixelBudget, process_image
from .inputs import INPUT_ERROR, extra_columns, is_url_list, read_folder, read_url_list
from .politeness import Again, HostScheduler
from .sources import (Attempts, RetryLater, check_url_source, host_of, read_folder_file, read_http, read_local,
                      read_s3)
from .schema import STATUS_DUPLICATE, STATUS_FAILED, STATUS_OPTED_OUT, rows_to_table
from .writer import ShardWriter, shard_stats, write_parquet

if TYPE_CHECKING:
    from .ingest_params import IngestParams


@dataclasses.dataclass
class IngestResult:
    root: str
    num_shards: int
    counts: dict[str, int]
    seconds: float
    failed_shards: dict[int, str]
    shards_written: int = 0  # by this call; 0 when every shard was complete already
    already_present: int = 0  # --append: URLs the dataset held already (not fetched)


def _read_source(row: dict[str, Any], base: str | None, opts: FetchOptions, downloader: Downloader,
                 attempts: dict[int, Attempts], i: int) -> bytes:
    source = row["source"]
    if base is not None:  # folder input: a path relative to the folder the user named
        return read_folder_file(base, source, opts.max_bytes)
    kind, target = check_url_source(source, opts)
    if kind == "http":
        return read_http(target, downloader, attempts.setdefault(i, Attempts.for_options(opts)))
    return read_s3(target, opts.max_bytes) if kind == "s3" else read_local(target, opts.max_bytes)


def fetch_and_process(rows: list[dict[str, Any]], base: str | None, image_opts: ImageOptions,
                      fetch_opts: FetchOptions, threads: int) -> tuple[list[tuple[Any, Exception | None]], dict]:
    """``(processed image or None, failure or None)`` per row, in row order, and the per-host stats.

    Downloads go through the per-host scheduler (concurrency, rate, Retry-After);
    decoding shares one pixel budget, so a task holds a bounded amount of
    decoded pixels however many threads it runs.
    """
    budget = PixelBudget(image_opts.max_task_pixels)
    attempts: dict[int, Attempts] = {}
    scheduler = HostScheduler(fetch_opts.host_concurrency, fetch_opts.host_rate)

    def work(i: int):
        row = rows[i]
        if row.get(INPUT_ERROR):
            return None, FetchFailed(*row[INPUT_ERROR].split(": ", 1))
        try:
            data = _read_source(row, base, fetch_opts, downloader, attempts, i)
            return process_image(data, image_opts, budget), None
        except RetryLater as r:
            raise Again(r.delay, r.host_wide) from None
        except (FetchFailed, ImageRejected) as e:
            return None, e
        except Exception as e:  # noqa: BLE001 - never lose the shard to one odd sample
            return None, FetchFailed("error", f"{type(e).__name__}: {e}"[:300])

    hosts = [host_of(r["source"]) if base is None else "" for r in rows]
    with Downloader(fetch_opts, pool_maxsize=threads) as downloader:
        results = scheduler.run(hosts, work, threads)
    return results, {**scheduler.stats(), "peak_pixels": budget.peak}


def ingest_shard(
    shard: int,
    *,
    root: str,
    table: pa.Table,
    shard_size: int,
    base: str | None,
    image_opts: ImageOptions,
    fetch_opts: FetchOptions,
    threads: int,
    dedup: bool,
    first_shard: int = 0,
) -> dict[str, Any]:
    """Fetch, validate, transform and write shard ``shard`` (rows of ``table`` from ``first_shard`` on)."""
    rows = table.slice((shard - first_shard) * shard_size, shard_size).to_pylist()
    writer = ShardWriter(root, shard, extra_schema=extra_columns(table))
    try:
        results, fetch_stats = fetch_and_process(rows, base, image_opts, fetch_opts, threads)
        _refuse_all_code_errors(shard, results)
        first_by_hash: dict[str, str] = {}
        for row, (img, err) in zip(rows, results):
            key = row.pop("key")
            row.pop(INPUT_ERROR, None)
            write_result(writer, key, row, img, err, first_by_hash if dedup else None)
        stats = writer.commit()
        stats["fetch"] = fetch_stats
        return stats
    finally:
        writer.cleanup()


def write_result(writer: ShardWriter, key: str, meta: dict[str, Any], img: Any, err: Exception | None,
                 first_by_hash: dict[str, str] | None) -> None:
    """One input's outcome as the writer's next row: a failure, a within-shard duplicate
    (``first_by_hash`` maps pixel hashes seen so far to their key; None: no dedup), or a sample."""
    meta = dict(meta)
    if err is not None:
        status = STATUS_OPTED_OUT if getattr(err, "reason", "") == "opted_out" else STATUS_FAILED
        writer.add_failure(key, meta, status, str(err))
        return
    if first_by_hash is not None and img.sha256 in first_by_hash:
        meta.update(sha256=img.sha256, width=img.width, height=img.height, duplicate_of=first_by_hash[img.sha256])
        writer.add_failure(key, meta, STATUS_DUPLICATE, f"duplicate: same pixels as {first_by_hash[img.sha256]}")
        return
    if first_by_hash is not None:
        first_by_hash[img.sha256] = key
    meta.update(width=img.width, height=img.height, original_width=img.original_width,
                original_height=img.original_height, sha256=img.sha256)
    writer.add(key, img.data, img.ext, meta, caption=meta.get("caption"))


def _refuse_all_code_errors(shard: int, results: list[tuple[Any, Exception | None]]) -> None:
    """A shard whose every row hit a bug (not a bad input) must fail, not be recorded complete:
    a re-run after the fix then retries it instead of keeping a shard of failures."""
    errors = [e for _, e in results if e is not None and getattr(e, "reason", "") == "error"]
    if results and len(errors) == len(results):
        raise RuntimeError(f"every sample of shard {shard:05d} failed with an internal error, e.g. {errors[0]}")


def _check_existing(root: str, stage: str, params: dict[str, Any]) -> dict[str, Any] | None:
    params = manifest_mod.normalize(params)
    existing = manifest_mod.load(root)
    if existing is None:
        return None
    if existing.get("stage") != stage or existing.get("parameters") != params:
        changed = sorted(k for k in set(params) | set(existing.get("parameters") or {})
                         if params.get(k) != (existing.get("parameters") or {}).get(k))
        raise DatasetError(
            f"{root} already holds a dataset made by `{existing.get('stage')}` with other parameters "
            f"({', '.join(changed) or 'stage differs'}); write to a new --output, or remove it to start over"
        )
    return existing


def ingest_table(
    table: pa.Table,
    output: str,
    *,
    stage_params: dict[str, Any],
    base: str | None = None,
    shard_size: int = 1000,
    workers: int | None = None,
    threads: int = 16,
    image_opts: ImageOptions = ImageOptions(),
    fetch_opts: FetchOptions = FetchOptions(),
    dedup: bool = True,
    summary: bool = True,
) -> IngestResult:
    """Shard an input table (columns source, key, [caption, label, extras]) into ``output``.

    ``fetch_opts`` host limits are for the whole run; each shard task gets its
    share (``task_fetch_options``).
    """
    if shard_size < 1:
        raise ValueError("--shard-size must be at least 1")
    n = table.num_rows
    num_shards = max(1, -(-n // shard_size))
    params = dict(stage_params, shard_size=shard_size, image=_image_record(image_opts), num_inputs=n)
    existing = _check_existing(output, "shard", params)
    if existing is None:
        m = manifest_mod.new("shard", params, parent=None, num_shards=num_shards)
        storage.makedirs(output)
    else:
        m = existing
    m["fetch"] = manifest_mod.normalize(
        {k: v for k, v in dataclasses.asdict(fetch_opts).items() if k != "user_agent"}) if base is None else None
    manifest_mod.save(output, m)
    done = set(Dataset(output).completed_shards())
    todo = [s for s in range(num_shards) if s not in done]
    init_ray()
    in_flight = max(1, min(workers or int(cluster_cpus()), len(todo) or 1))

    def on_done(shard: int, stats: dict[str, Any]) -> None:
        manifest_mod.record_shard(output, shard, stats)

    result = run_shards(
        ingest_shard, list(range(num_shards)),
        kwargs=dict(root=output, table=table, shard_size=shard_size, base=base, image_opts=image_opts,
                    fetch_opts=task_fetch_options(fetch_opts, in_flight), threads=threads, dedup=dedup),
        done=done, on_done=on_done, desc="shard", workers=workers, num_cpus=1.0,
    )
    if not result.failed and dedup:
        mark_cross_shard_duplicates(output)
    m = manifest_mod.load(output) or {}
    if summary:
        print_summary(result, title=f"shard -> {output}", totals=m.get("counts", {}))
        print_host_summary(result, fetch_opts, in_flight)
    raise_if_failed(result)
    return IngestResult(output, num_shards, m.get("counts", {}), result.seconds, result.failed, len(result.done))


def _image_record(opts: ImageOptions) -> dict[str, Any]:
    """Image options as recorded: what decides the output bytes (not the memory bound)."""
    return {k: v for k, v in dataclasses.asdict(opts).items() if k != "max_task_pixels"}


def task_fetch_options(opts: FetchOptions, in_flight: int) -> FetchOptions:
    """One task's share of the whole run's per-host limits when ``in_flight`` tasks run at once.

    Rate and concurrency are divided so that all tasks together keep them
    (concurrency at least 1 per task); every task may hit the same host.
    """
    k = max(1, int(in_flight))
    return dataclasses.replace(opts, host_rate=opts.host_rate / k if opts.host_rate else 0.0,
                               host_concurrency=max(1, opts.host_concurrency // k) if opts.host_concurrency else 0)


def print_host_summary(result: Any, opts: FetchOptions, in_flight: int) -> None:
    """Per-host politeness of this run: the limits and which hosts made us wait (Retry-After)."""
    throttled: dict[str, int] = {}
    seconds = 0.0
    for st in result.done.values():
        h = st.get("fetch") or {}
        seconds += float(h.get("throttle_seconds") or 0)
        for host, n in (h.get("throttled_hosts") or {}).items():
            throttled[host] = throttled.get(host, 0) + int(n)
    if not result.done or (not throttled and not opts.host_rate):
        return
    limits = (f"per host: {opts.host_concurrency or 'no'} concurrent cap, "
              f"{f'{opts.host_rate:g}/s' if opts.host_rate else 'no rate limit'} (shared by {in_flight} task(s))")
    top = ", ".join(f"{h} {n}x" for h, n in sorted(throttled.items(), key=lambda kv: -kv[1])[:5])
    print(f"{limits}; Retry-After waits: {sum(throttled.values())} ({seconds:.1f}s){': ' + top if top else ''}")


def mark_cross_shard_duplicates(root: str) -> int:
    """Mark ok samples whose pixels equal an earlier shard's sample as duplicates.

    Within a shard the task already did this; across shards it can only be
    done once all are written. The first occurrence in input order is kept;
    later ones get status ``duplicate`` and ``duplicate_of`` in the index
    (their bytes stay in the tar, readers go by the index). Idempotent.
    """
    first: dict[str, str] = {}
    first_shard: dict[str, int] = {}
    marked = cross = 0
    recounted: dict[int, dict[str, int]] = {}
    for shard in Dataset(root).completed_shards():
        idx = storage.read_parquet(layout.index_uri(root, shard))
        rows = idx.to_pylist()
        changed = False
        for r in rows:
            if r["status"] == "ok" and r["sha256"]:
                k0 = first.setdefault(r["sha256"], r["key"])
                first_shard.setdefault(k0, shard)
                if k0 != r["key"]:
                    r.update(status=STATUS_DUPLICATE, duplicate_of=k0, error=f"duplicate: same pixels as {k0}")
                    changed = True
                    marked += 1
            # Counted from the index, so duplicates marked by an earlier pass count too.
            if r["status"] == STATUS_DUPLICATE and first_shard.get(r.get("duplicate_of") or "", shard) != shard:
                cross += 1
        if changed:
            extra = pa.schema([f for f in idx.schema if f.name not in rows_to_table([]).schema.names])
            write_parquet(layout.index_uri(root, shard), rows_to_table(rows, extra))
        recounted[shard] = shard_stats(rows, 0.0)["counts"]
    m = manifest_mod.load(root)
    if m is not None:
        # Counts are recomputed from the indices, not adjusted by this pass's marks: a
        # driver killed between an index rewrite and this save still ends with true counts.
        stats = m.setdefault("shard_stats", {})
        for shard, counts in recounted.items():
            stats.setdefault(f"{shard:05d}", {})["counts"] = counts
        m["counts"] = manifest_mod.sum_counts(stats)
        m["cross_shard_duplicates"] = cross
        manifest_mod.save(root, m)
    return marked


def ingest_folder(
    input_dir: str,
    output: str,
    *,
    labels_from_dirs: bool = False,
    shard_size: int = 1000,
    workers: int | None = None,
    threads: int = 8,
    image_opts: ImageOptions = ImageOptions(),
    dedup: bool = True,
    summary: bool = True,
) -> IngestResult:
    """Shard a local or s3:// folder tree of images (see ``read_folder``)."""
    table, ignored = read_folder(input_dir, labels_from_dirs=labels_from_dirs)
    if ignored and summary:
        print(f"note: ignored {ignored} non-image file(s) under {input_dir}")
    params = {"input": input_dir, "kind": "folder", "labels_from_dirs": labels_from_dirs, "dedup": dedup}
    return ingest_table(table, output, stage_params=params, base=input_dir, shard_size=shard_size,
                        workers=workers, threads=threads, image_opts=image_opts, dedup=dedup, summary=summary)


def ingest_urls(
    url_list: str,
    output: str,
    *,
    url_col: str = "url",
    caption_col: str | None = "caption",
    label_col: str | None = None,
    shard_size: int = 1000,
    workers: int | None = None,
    threads: int = 16,
    image_opts: ImageOptions = ImageOptions(),
    fetch_opts: FetchOptions = FetchOptions(),
    dedup: bool = True,
    summary: bool = True,
) -> IngestResult:
    """Download and shard a URL list (parquet/CSV/TSV/JSONL/txt, optionally gzipped)."""
    table = read_url_list(url_list, url_col=url_col, caption_col=caption_col, label_col=label_col)
    # Fetch options decide how hard we try, not what a sample becomes: they are recorded
    # (manifest "fetch") but a re-run with other timeouts resumes instead of being refused.
    params = {"input": url_list, "kind": "urls", "url_col": url_col, "caption_col": caption_col,
              "label_col": label_col, "dedup": dedup}
    return ingest_table(table, output, stage_params=params, base=None, shard_size=shard_size, workers=workers,
                        threads=threads, image_opts=image_opts, fetch_opts=fetch_opts, dedup=dedup, summary=summary)


def run_ingest(params: "IngestParams") -> str:
    """Run `webcurate shard` (or the `shard:` step) from validated parameters; returns the summary line."""
    if params.adopt:
        ds = adopt(params.input, workers=params.workers, max_member_bytes=params.max_bytes)
        return f"adopted {ds.num_shards} shard(s) in place: {params.input}"
    if params.retry_failed:
        from .retry_failed import parse_reasons, retry_failed

        rec = retry_failed(params.output, parse_reasons(params.retry_failed), workers=params.workers,
                           threads=params.threads, fetch_opts=params.fetch_options(),
                           max_task_pixels=params.max_task_pixels)
        return (f"retried {rec['retried']} failed row(s) ({', '.join(rec['reasons'])}) in {len(rec['shards'])} "
                f"shard(s) of {params.output}: {rec['recovered']} recovered")
    if params.append:
        from .append import append_urls

        result = append_urls(params.input, params.output, url_col=params.url_col, caption_col=params.caption_col,
                             label_col=params.label_col, workers=params.workers, threads=params.threads,
                             fetch_opts=params.fetch_options(), max_task_pixels=params.max_task_pixels)
        verb = f"appended {result.num_shards} shard(s) ({result.already_present} URL(s) already present)"
    else:
        result = ingest(params.input, params.output, **params.ingest_kwargs())
        verb = f"wrote {result.num_shards} shard(s)"
    c = result.counts
    return (f"{verb} to {params.output}: {c.get('ok', 0)} ok, {c.get('failed', 0)} failed, "
            f"{c.get('duplicate', 0)} duplicates, {c.get('opted_out', 0)} opted out in {result.seconds:.1f}s")


def ingest(input_uri: str, output: str, **kwargs: Any) -> IngestResult:
    """Dispatch on the input: a URL list file, else a folder of images."""
    if is_url_list(input_uri):
        kwargs.pop("labels_from_dirs", None)
        return ingest_urls(input_uri, output, **kwargs)
    for k in ("url_col", "caption_col", "label_col", "fetch_opts"):
        kwargs.pop(k, None)
    return ingest_folder(input_uri, output, **kwargs)

