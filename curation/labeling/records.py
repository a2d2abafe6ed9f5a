"""The per-sample record an LF sees.

A record holds, for one ``ok`` sample: every index column (key, source,
caption, label, width, height, bytes, ext, sha256, extra input columns),
every field of the sample's json that the index lacks, ``url`` (the json's
url, else ``source``), ``caption`` (the ``.txt`` when present),
``image_bytes`` (lazily decoded to a PIL image as ``image``) and, when the
sidecars exist for the shard:

- ``embeddings/``: ``embedding`` (D,) float32, None where embedding failed;
- ``clusters/``: ``level_1``, ``level_2``, ... cluster ids (other columns as
  ``cluster_<name>``);
- ``retrieve/``: ``retrieval_score``, ``retrieval_seed_key`` (every column
  as ``retrieval_<name>``);
- any other sidecar asked for: ``<stage>_<column>``.

Records allow ``x.caption`` (like the pandas row Snorkel passes) and
``x["caption"]``. A missing field raises ``AttributeError``/``KeyError``
naming the field and listing those present.
"""
from __future__ import annotations

import io
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa

from webcurate.shards.dataset import Dataset
from webcurate.shards.schema import STATUS_OK

# Sidecars read by default when a dataset has them.
DEFAULT_SIDECARS = ("embeddings", "clusters", "retrieve")
# Sidecar bookkeeping columns that are not sample facts.
_SKIP_COLUMNS = {"key", "status", "error", "shard"}


class Record(dict):
    """One sample's fields with attribute access (``x.caption``)."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            pass
        if name == "image" and "image_bytes" in self:
            from PIL import Image

            img = Image.open(io.BytesIO(self["image_bytes"]))
            img.load()
            self["image"] = img  # decoded once per record
            return img
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"record has no field {name!r}; it has: {', '.join(sorted(self))}")

    def __missing__(self, name: str) -> Any:
        raise KeyError(f"record has no field {name!r}; it has: {', '.join(sorted(self))}")


class RecordBatch(list):
    """The records of one shard, plus column arrays for vectorised LFs.

    ``columns["embedding"]``: (n, D) float32, NaN rows where missing.
    """

    def __init__(self, records: Iterable[Record] = (), columns: dict[str, np.ndarray] | None = None):
        super().__init__(records)
        self.columns: dict[str, np.ndarray] = dict(columns or {})

    def matrix(self, name: str) -> np.ndarray:
        """(n, D) array of field ``name`` (stacked from records when no column)."""
        if name in self.columns:
            return self.columns[name]
        rows = [r.get(name) for r in self]
        if not rows or any(v is None for v in rows):
            missing = sum(v is None for v in rows)
            raise KeyError(f"field {name!r} is missing on {missing} of {len(rows)} records")
        return np.stack([np.asarray(v, dtype=np.float32) for v in rows])


def sidecar_field(stage: str, column: str) -> str:
    """The record field name of a sidecar column."""
    if stage == "embeddings":
        return column
    if stage == "clusters":
        return column if column.startswith("level_") else f"cluster_{column}"
    if stage == "retrieve":
        return f"retrieval_{column}"
    return f"{stage}_{column}"


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list / fixed_size_list column -> (n, D) float32 with NaN rows for nulls."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
        # .values holds slots for null rows too; respect the array's offset.
        vals = arr.values.slice(arr.offset * d, n * d).to_numpy(zero_copy_only=False)
        out = np.asarray(vals, dtype=np.float32).reshape(n, d).copy()
    else:
        rows = arr.to_pylist()
        d = max((len(r) for r in rows if r is not None), default=0)
        out = np.full((n, d), np.nan, dtype=np.float32)
        for i, r in enumerate(rows):
            if r is not None:
                if len(r) != d:
                    raise ValueError(f"embedding row {i} has {len(r)} values, others {d}")
                out[i] = r
    out[~valid] = np.nan
    return out


def available_sidecars(dataset: Dataset, wanted: Sequence[str] | None = None) -> dict[str, list[int]]:
    """Sidecar stages to read and the shards each covers (stages with no parts are left out)."""
    stages = list(wanted) if wanted is not None else list(DEFAULT_SIDECARS)
    out = {}
    for stage in stages:
        done = dataset.sidecar_completed(stage)
        if done:
            out[stage] = done
    return out


def shard_records(
    dataset: Dataset,
    shard: int,
    *,
    sidecars: Sequence[str] = (),
    read_samples: bool = True,
) -> RecordBatch:
    """The records of the ``ok`` samples of one shard, in index order.

    ``sidecars``: stages whose part for this shard is merged in (the caller
    checks they exist, see ``available_sidecars``). ``read_samples``: also
    read the tar for json fields, ``.txt`` captions and image bytes.
    """
    index = dataset.read_index(shard)
    rows = [r for r in index.to_pylist() if r.get("status") == STATUS_OK]
    samples: dict[str, Any] = {}
    if read_samples and rows:
        for s in dataset.iter_samples(shard):
            samples[s.key] = s
    records = RecordBatch()
    pos: dict[str, int] = {}
    for r in rows:
        rec = Record(r)
        s = samples.get(r["key"])
        if s is not None:
            for k, v in s.meta.items():
                if rec.get(k) is None:
                    rec[k] = v
            if s.caption is not None:
                rec["caption"] = s.caption
            rec["image_bytes"] = s.image
            rec["ext"] = s.ext
        if rec.get("url") is None:
            rec["url"] = rec.get("source")
        pos[r["key"]] = len(records)
        records.append(rec)
    n = len(records)
    for stage in sidecars:
        part = dataset.read_sidecar_part(stage, shard)
        if "key" not in part.column_names:
            raise ValueError(f"sidecar {stage}/ part {shard} has no `key` column")
        idx = np.array([pos.get(k, -1) for k in part.column("key").to_pylist()], dtype=np.int64)
        hit = idx >= 0
        for col in part.column_names:
            if col in _SKIP_COLUMNS:
                continue
            name = sidecar_field(stage, col)
            column = part.column(col)
            typ = column.type
            if pa.types.is_list(typ) or pa.types.is_fixed_size_list(typ) or pa.types.is_large_list(typ):
                mat = embedding_matrix(column)
                full = np.full((n, mat.shape[1]), np.nan, dtype=np.float32)
                full[idx[hit]] = mat[hit]
                records.columns[name] = full
                missing = np.isnan(full).any(axis=1) if full.shape[1] else np.ones(n, dtype=bool)
                for i in range(n):
                    records[i][name] = None if missing[i] else full[i]
            else:
                values = column.to_pylist()
                for rec in records:
                    rec[name] = None  # no row in this sidecar: known-missing, not absent
                for j in np.nonzero(hit)[0]:
                    records[idx[j]][name] = values[j]
    return records
