"""Adopt a WebDataset folder made elsewhere (e.g. by img2dataset) in place.

The tars are not rewritten: we add ``index/NNNNN.parquet`` and
``_manifest.json`` beside them. Keys stay as the tars have them (renaming
would mean rewriting). img2dataset's own per-shard parquet, when present,
contributes its failed rows, so failures it recorded are not lost; its json
fields (url, caption, …) fill our columns. ``sha256`` is over the encoded
bytes here (decoding every image just to index it is not worth it).

A foreign tar is input we did not make, so every oddity is one sample's
failure row, never the shard's: invalid or non-object ``.json``, fields of
the wrong type, a non-UTF-8 ``.txt``, an oversized member (skipped unread),
a truncated tar (the samples before the break are kept), and a key already
seen in an earlier shard (``duplicate_key``).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
from typing import IO, Any, Iterator

from PIL import Image

from . import layout, manifest as manifest_mod, storage
from .dataset import Dataset
from .errors import DatasetError
from .progress import print_summary
from .schema import STATUS_FAILED, STATUS_OK, empty_row, rows_to_table
from .stage import raise_if_failed, run_shards
from .tar_samples import TarBroken, TarSample, image_ext, iter_tar
from .writer import shard_stats, write_parquet

# json field -> (index column, accepted types)
_FIELDS: dict[str, tuple[str, tuple[type, ...]]] = {
    "url": ("source", (str,)), "caption": ("caption", (str,)), "label": ("label", (str, int)),
    "original_width": ("original_width", (int,)), "original_height": ("original_height", (int,)),
}
DEFAULT_MAX_MEMBER = 32 * 1024 * 1024


@contextlib.contextmanager
def _open_tar(uri: str) -> Iterator[IO[bytes]]:
    """A local tar opened for seeking (oversized members are skipped without reading them),
    or an S3 tar as one streamed GET (never all of it in memory)."""
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        try:
            body = storage.s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as e:  # noqa: BLE001 - botocore raises many types
            raise storage.StorageError(f"read {uri} failed: {storage._error_code(e) or type(e).__name__}") from e
        try:
            yield body
        finally:
            body.close()
        return
    with open(uri, "rb") as f:
        yield f


def _fields_from_json(raw: bytes) -> tuple[dict[str, Any], str | None]:
    """Index columns from a sample's json, and what is wrong with it (None: nothing)."""
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}, "bad_json: not valid JSON"
    if not isinstance(meta, dict):
        return {}, f"bad_json: a JSON {type(meta).__name__}, not an object"
    row: dict[str, Any] = {}
    for name, (column, types) in _FIELDS.items():
        v = meta.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, types):
            return row, f"bad_json: field {name!r} is a {type(v).__name__}"
        row[column] = str(v) if column == "label" else v
    return row, None


def _row_of(sample: TarSample, shard: int, tar_name: str) -> dict[str, Any]:
    fields, problem = _fields_from_json(sample.files["json"]) if "json" in sample.files else ({}, None)
    row = empty_row(sample.key, shard, fields.get("source") or f"{tar_name}#{sample.key}")
    row.update(fields)
    if "txt" in sample.files and not row.get("caption"):
        try:
            row["caption"] = sample.files["txt"].decode("utf-8")
        except UnicodeDecodeError:
            problem = problem or "bad_caption: .txt is not UTF-8"
    big = image_ext(sample.too_large)
    ext = image_ext(sample.files)
    if ext is None and big is not None:
        row.update(status=STATUS_FAILED, ext=big, bytes=sample.too_large[big],
                   error=f"body_too_large: {sample.key}.{big} is {sample.too_large[big]} bytes")
        return row
    if ext is None:
        row.update(status=STATUS_FAILED, error="no_image: sample has no image file")
        return row
    img = sample.files[ext]
    row.update(ext=ext, bytes=len(img), sha256=hashlib.sha256(img).hexdigest())
    try:
        w, h = Image.open(io.BytesIO(img)).size  # header only
    except Exception as e:  # noqa: BLE001 - any decoder complaint is this sample's
        row.update(status=STATUS_FAILED, error=f"not_an_image: {type(e).__name__}")
        return row
    row.update(width=w, height=h, status=STATUS_FAILED if problem else STATUS_OK, error=problem)
    return row


def _upstream_rows(uri: str, shard: int, seen: set[str], broken: str | None) -> list[dict[str, Any]]:
    """img2dataset's parquet beside the tar: its failures, and successes the tar did not deliver."""
    sibling = uri[: -len(".tar")] + ".parquet"
    if not storage.exists(sibling):
        return []
    rows = []
    for r in storage.read_parquet(sibling).to_pylist():
        key = str(r.get("key"))
        if key in seen:
            continue
        row = empty_row(key, shard, str(r.get("url") or ""))
        caption = r.get("caption")
        row["caption"] = caption if isinstance(caption, str) else None
        if r.get("status") == "success":
            why = f"truncated_tar: {broken}" if broken else "missing_from_tar: upstream says success"
            row.update(status=STATUS_FAILED, error=why[:300])
        else:
            row.update(status=STATUS_FAILED,
                       error=f"upstream_{r.get('status') or 'failed'}: {r.get('error_message') or ''}"[:300])
        rows.append(row)
        seen.add(key)
    return rows


def adopt_shard(shard: int, *, root: str, tar_name: str, max_member_bytes: int = DEFAULT_MAX_MEMBER) -> dict[str, Any]:
    """Index one existing tar (and img2dataset's sibling parquet, if any)."""
    t0 = time.time()
    uri = storage.join(root, tar_name)
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    broken = None
    with _open_tar(uri) as f:
        for item in iter_tar(f, max_member_bytes):
            if isinstance(item, TarBroken):
                broken = item.error
                if item.partial_key is not None and item.partial_key not in seen:
                    row = empty_row(item.partial_key, shard, f"{tar_name}#{item.partial_key}")
                    row.update(status=STATUS_FAILED, error=f"truncated_tar: {item.error}"[:300])
                    seen[item.partial_key] = len(rows)
                    rows.append(row)
                break
            row = _row_of(item, shard, tar_name)
            if item.key in seen:  # the same key twice in one tar: readers could not tell them apart
                row.update(status=STATUS_FAILED, error=f"duplicate_key: {item.key} appears twice in {tar_name}")
            seen.setdefault(item.key, len(rows))
            rows.append(row)
    rows += _upstream_rows(uri, shard, set(seen), broken)
    write_parquet(layout.index_uri(root, shard), rows_to_table(rows))
    stats = shard_stats(rows, time.time() - t0)
    if broken:
        stats["broken"] = broken
    return stats


def mark_duplicate_keys(root: str) -> int:
    """Mark rows whose key an earlier shard already holds as ``duplicate_key`` failures (idempotent).

    Foreign shards are written independently, so only the driver, after all
    are indexed, can see a key twice; the first occurrence in shard order stays.
    """
    first: dict[str, int] = {}
    marked = 0
    for shard in Dataset(root).completed_shards():
        uri = layout.index_uri(root, shard)
        rows = storage.read_parquet(uri).to_pylist()
        changed = False
        for r in rows:
            owner = first.setdefault(r["key"], shard)
            if owner != shard and r["status"] == STATUS_OK:
                r.update(status=STATUS_FAILED, error=f"duplicate_key: {r['key']} is already in shard {owner:05d}")
                changed = True
                marked += 1
        if changed:
            write_parquet(uri, rows_to_table(rows))
            manifest_mod.record_shard(root, shard, shard_stats(rows, 0.0))
    return marked


def adopt(root: str, workers: int | None = None, summary: bool = True,
          max_member_bytes: int = DEFAULT_MAX_MEMBER) -> Dataset:
    """Index every ``*.tar`` directly under ``root`` (sorted by name) in place."""
    tars = sorted(e.name for e in storage.list_dir(root) if e.name.endswith(".tar") and not e.is_dir)
    if not tars:
        raise DatasetError(f"{root} holds no .tar shards to adopt")
    params = manifest_mod.normalize({"input": root, "kind": "adopt", "shard_files": tars})
    existing = manifest_mod.load(root)
    if existing is None or existing.get("parameters") != params:
        manifest_mod.save(root, manifest_mod.new("adopt", params, parent=None, num_shards=len(tars), shard_files=tars))
    done = set(Dataset(root).completed_shards())
    result = run_shards(
        _adopt_task, list(range(len(tars))), kwargs={"root": root, "tars": tars, "max_member_bytes": max_member_bytes},
        done=done, on_done=lambda s, st: manifest_mod.record_shard(root, s, st), desc="adopt", workers=workers,
    )
    if not result.failed:
        mark_duplicate_keys(root)
    if summary:
        print_summary(result, title=f"adopt: {root}")
    raise_if_failed(result)
    return Dataset(root)


def _adopt_task(shard: int, *, root: str, tars: list[str], max_member_bytes: int) -> dict[str, Any]:
    return adopt_shard(shard, root=root, tar_name=tars[shard], max_member_bytes=max_member_bytes)
