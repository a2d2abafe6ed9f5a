"""The per-sample index: one parquet row per input sample, ok or failed."""
from __future__ import annotations

import pyarrow as pa

# Statuses a row can have. Failures carry a reason in ``error``.
STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_DUPLICATE = "duplicate"
STATUS_OPTED_OUT = "opted_out"

INDEX_FIELDS: list[pa.Field] = [
    pa.field("key", pa.string()),
    pa.field("shard", pa.int32()),
    pa.field("source", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("label", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("bytes", pa.int64()),
    pa.field("ext", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("duplicate_of", pa.string()),
]
INDEX_SCHEMA = pa.schema(INDEX_FIELDS)
CORE_COLUMNS = [f.name for f in INDEX_FIELDS]


def empty_row(key: str, shard: int, source: str) -> dict:
    """A row with every core column present (None where unknown)."""
    row = {name: None for name in CORE_COLUMNS}
    row.update(key=key, shard=shard, source=source)
    return row


def rows_to_table(rows: list[dict], extra_schema: pa.Schema | None = None) -> pa.Table:
    """Index rows -> table with the core schema first, then extra input columns.

    ``extra_schema`` fixes the types of extra metadata columns so every shard's
    index has the same schema; without it extras are inferred.
    """
    fields = list(INDEX_FIELDS)
    if extra_schema is not None:
        fields += [f for f in extra_schema if f.name not in CORE_COLUMNS]
    else:
        extra_names = sorted({k for r in rows for k in r} - set(CORE_COLUMNS))
        for name in extra_names:
            values = [r.get(name) for r in rows]
            fields.append(pa.field(name, pa.array(values).type if any(v is not None for v in values) else pa.string()))
    schema = pa.schema(fields)
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.table(columns, schema=schema)
