"""Small datasets in webcurate format for the loader and evaluation tests.

Loaded by file path from the test modules (pytest runs with --import-mode=importlib,
so test folders are not packages and this is not a conftest).
"""
from __future__ import annotations

import numpy as np
from photos import jpeg_bytes, make_photo  # noqa: F401 - re-exported for the tests


def id_colour(i: int) -> tuple[int, int, int]:
    """A flat colour that encodes sample id ``i`` (< 40) in its red channel."""
    return (6 * i + 3, 128, 200 - 4 * i)


def colour_id(rgb: np.ndarray) -> int:
    """Inverse of ``id_colour`` from a measured mean colour (JPEG moves values by a few)."""
    return int(round((float(rgb[0]) - 3) / 6))


def write_dataset(root: str, samples: list[tuple[str, bytes, str | None]], shard_size: int,
                  statuses: dict[str, str] | None = None) -> list[str]:
    """Write ``(key, jpeg bytes, label)`` samples as a webcurate dataset; return shard URIs.

    ``statuses`` overrides the index status of some keys after writing (as dedup does):
    their images stay in the tar.
    """
    from webcurate.shards import layout, manifest
    from webcurate.shards.writer import ShardWriter, write_parquet

    shards = [samples[i:i + shard_size] for i in range(0, len(samples), shard_size)]
    manifest.save(root, manifest.new("test", {}, None, len(shards)))
    for s, chunk in enumerate(shards):
        w = ShardWriter(root, s)
        for key, data, label in chunk:
            w.add(key, data, "jpg", {"source": f"mem://{key}", "label": label, "width": 0, "height": 0})
        stats = w.commit()
        if statuses:
            import pyarrow as pa
            import pyarrow.parquet as pq

            uri = layout.index_uri(root, s)
            t = pq.read_table(uri)
            st = [statuses.get(k, v) for k, v in zip(t["key"].to_pylist(), t["status"].to_pylist())]
            t = t.set_column(t.column_names.index("status"), "status", pa.array(st, pa.string()))
            write_parquet(uri, t)
        manifest.record_shard(root, s, stats)
    return [layout.shard_uri(root, s) for s in range(len(shards))]
