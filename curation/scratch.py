"""A global stage's intermediate arrays on the dataset's own storage, not in the driver or Ray's store.

A shuffle of P producer tasks into G consumer tasks held in Ray's object
store costs the driver one owned reference per (producer, consumer) pair,
and every piece under 100 KiB is kept inline in the driver's own memory:
at 1 B rows (100,000 parts, ~6,400 cell groups) that is 6.4e8 references
and most of the shuffled data in one process. Here each producer writes one
Arrow IPC file with one record batch per consumer (the sort-based shuffle
of MapReduce: data file + footer index), and a consumer reads batch ``j`` of
every producer's file with a ranged read. The driver holds only the scratch
folder's name and the producer count.

The folder is ``<root>/_scratch/<stage>-<token>/`` (local or S3, where every
task can reach it because it already reads the parts there), removed when the
stage ends, failed or not (``with Scratch(...)``).
"""
from __future__ import annotations

import math
import shutil
import uuid
from typing import Iterator

import numpy as np

from webcurate.shards import storage

SCRATCH_DIR = "_scratch"
# Share of a local disk's free space one wave of shuffled rows may take (S3 has no such limit: one wave).
DISK_SHARE = 0.5


class Scratch:
    """A stage's scratch folder: ``file(...)`` names files in it; removed on ``close`` / leaving ``with``."""

    def __init__(self, root: str, stage: str) -> None:
        self.uri = storage.join(storage.absolute(root), SCRATCH_DIR, f"{stage}-{uuid.uuid4().hex[:12]}")

    def file(self, *parts: str) -> str:
        """URI of a file (or sub-folder) inside the scratch folder."""
        return storage.join(self.uri, *parts)

    def drop(self, *parts: str) -> None:
        """Remove a sub-folder early (a finished wave)."""
        storage.delete_tree(self.file(*parts))

    def close(self) -> None:
        storage.delete_tree(self.uri)

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _column(a: np.ndarray, value_type=None):
    import pyarrow as pa

    a = np.ascontiguousarray(a)
    if a.ndim == 1:
        return pa.array(a, type=value_type)
    width = int(np.prod(a.shape[1:]))
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), type=value_type), width)


def _value_types(batches: list[dict[str, np.ndarray]]) -> dict:
    """Per column, the Arrow value type of its first non-empty batch (an empty object column alone says
    nothing: it would come out as ``null`` and differ from the other batches' strings)."""
    import pyarrow as pa

    types: dict = {}
    for b in batches:
        for k, v in b.items():
            if k not in types and len(v):
                types[k] = pa.array(np.ascontiguousarray(v).reshape(-1)[:1]).type
    return types


def _array(col) -> np.ndarray:
    import pyarrow as pa

    if pa.types.is_fixed_size_list(col.type):
        flat = col.values.to_numpy(zero_copy_only=False)
        return flat.reshape(len(col), col.type.list_size)
    return col.to_numpy(zero_copy_only=False)


def write_batches(uri: str, batches: list[dict[str, np.ndarray]]) -> int:
    """Write ``batches`` (same columns each: (n,) or (n, w) arrays) as one Arrow IPC file; bytes written.

    Batch ``j`` is what consumer ``j`` reads back with ``read_batch(uri, j)``.
    """
    import pyarrow as pa

    types = _value_types(batches)
    tables = [pa.RecordBatch.from_arrays([_column(v, types.get(k)) for k, v in b.items()], names=list(b))
              for b in batches]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, tables[0].schema) as writer:
        for t in tables:
            writer.write_batch(t)
    data = sink.getvalue()
    storage.write_bytes(uri, data, durable=False)
    return data.size


def read_batch(uri: str, j: int) -> dict[str, np.ndarray]:
    """Batch ``j`` of a file written by ``write_batches`` (a ranged read: footer + that batch)."""
    import pyarrow as pa

    with storage.open_input_file(uri) as f:
        batch = pa.ipc.open_file(f).get_batch(j)
        return {name: _array(batch.column(i)) for i, name in enumerate(batch.schema.names)}


def read_batches(uris: list[str], j: int) -> Iterator[dict[str, np.ndarray]]:
    """Batch ``j`` of each file, in order, skipping empty ones."""
    for uri in uris:
        b = read_batch(uri, j)
        if len(next(iter(b.values()))):
            yield b


def waves(root: str, groups: int, volume_bytes: float, disk_share: float = DISK_SHARE) -> list[list[int]]:
    """Groups split into waves whose shuffle files fit ``disk_share`` of the local disk's free space.

    Every wave re-reads and splits every part, so there are as few as the
    disk allows: one on S3, one locally unless the disk is short.
    """
    n = 1
    if not storage.is_s3(root):
        free = float(shutil.disk_usage(storage.absolute(root)).free)
        n = max(1, min(groups, math.ceil(volume_bytes / max(disk_share * free, 1.0))))
    per = math.ceil(groups / n)
    return [list(range(g, min(groups, g + per))) for g in range(0, groups, per)]
