"""Adopt a WebDataset folder made elsewhere (e.g. by img2dataset) in place.

The tars are not rewritten: we add ``index/NNNNN.parquet`` and
``_manifest.json`` beside them. Keys stay as the tars have them (renaming
would mean rewriting). img2dataset's own per-shard parquet, when present,
contributes its failed rows, so failures it recorded are not lost; its json
fields (url, caption, …) fill our columns. ``sha256`` is over the encoded
bytes here (decoding every image just to index it is not worth it).
"""
from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import pyarrow.parquet as pq
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from . import manifest as manifest_mod, storage
from .dataset import IMAGE_EXTS, Dataset, DatasetError
from .schema import STATUS_FAILED, STATUS_OK, empty_row, rows_to_table
from .writer import shard_stats, write_parquet
from . import layout

_FIELD_MAP = {"url": "source", "caption": "caption", "label": "label",
              "original_width": "original_width", "original_height": "original_height"}


def _row_from_json(meta: dict[str, Any]) -> dict[str, Any]:
    row = {}
    for k, v in meta.items():
        if k in _FIELD_MAP:
            row[_FIELD_MAP[k]] = v if k not in ("label",) else (None if v is None else str(v))
    return row


def adopt_shard(shard: int, *, root: str, tar_name: str) -> dict[str, Any]:
    """Index one existing tar (and img2dataset's sibling parquet, if any)."""
    import time

    t0 = time.time()
    uri = storage.join(root, tar_name)
    data = storage.read_bytes(uri)
    rows: list[dict[str, Any]] = []
    seen = set()
    files = ({**f, "__url__": uri} for f in tar_file_iterator(io.BytesIO(data)))
    for s in group_by_keys(files):
        key = s["__key__"]
        seen.add(key)
        meta = json.loads(s["json"]) if "json" in s else {}
        row = empty_row(key, shard, meta.get("url") or f"{tar_name}#{key}")
        row.update(_row_from_json(meta))
        row["shard"] = shard
        if "txt" in s and not row.get("caption"):
            row["caption"] = s["txt"].decode("utf-8", "replace")
        ext = next((e for e in IMAGE_EXTS if e in s), None)
        if ext is None:
            row.update(status=STATUS_FAILED, error="no_image: sample has no image file")
            rows.append(row)
            continue
        img = s[ext]
        try:
            w, h = Image.open(io.BytesIO(img)).size
            row.update(status=STATUS_OK, width=w, height=h)
        except Exception as e:
            row.update(status=STATUS_FAILED, error=f"not_an_image: {type(e).__name__}")
        row.update(ext=ext, bytes=len(img), sha256=hashlib.sha256(img).hexdigest())
        rows.append(row)
    sibling = uri[: -len(".tar")] + ".parquet"
    if storage.exists(sibling):
        fs, path = storage.filesystem(sibling)
        for r in pq.read_table(path, filesystem=fs).to_pylist():
            key = str(r.get("key"))
            if key in seen or r.get("status") == "success":
                continue
            row = empty_row(key, shard, r.get("url") or "")
            row.update(caption=r.get("caption"), status=STATUS_FAILED,
                       error=f"upstream_{r.get('status') or 'failed'}: {r.get('error_message') or ''}"[:300])
            rows.append(row)
    write_parquet(layout.index_uri(root, shard), rows_to_table(rows))
    return shard_stats(rows, time.time() - t0)


def adopt(root: str, workers: int | None = None, summary: bool = True) -> Dataset:
    """Index every ``*.tar`` directly under ``root`` (sorted by name) in place."""
    from webcurate.shards.progress import print_summary
    from webcurate.shards.stage import raise_if_failed, run_shards

    tars = sorted(e.name for e in storage.list_dir(root) if e.name.endswith(".tar") and not e.is_dir)
    if not tars:
        raise DatasetError(f"{root} holds no .tar shards to adopt")
    params = manifest_mod.normalize({"input": root, "kind": "adopt", "shard_files": tars})
    existing = manifest_mod.load(root)
    if existing is None or existing.get("parameters") != params:
        manifest_mod.save(root, manifest_mod.new("adopt", params, parent=None, num_shards=len(tars), shard_files=tars))
    ds = Dataset(root)
    done = set(ds.completed_shards())
    result = run_shards(
        _adopt_task, list(range(len(tars))), kwargs={"root": root, "tars": tars}, done=done,
        on_done=lambda s, st: manifest_mod.record_shard(root, s, st), desc="adopt", workers=workers,
    )
    if summary:
        print_summary(result, title=f"adopt: {root}")
    raise_if_failed(result)
    return ds.reload()


def _adopt_task(shard: int, *, root: str, tars: list[str]) -> dict[str, Any]:
    return adopt_shard(shard, root=root, tar_name=tars[shard])
