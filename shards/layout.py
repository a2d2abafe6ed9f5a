"""Where things live inside a dataset root (local folder or S3 prefix)."""
from __future__ import annotations

from . import storage

SHARDS_DIR = "shards"
INDEX_DIR = "index"


def shard_name(shard: int) -> str:
    return f"{int(shard):05d}"


def shard_uri(root: str, shard: int) -> str:
    return storage.join(root, SHARDS_DIR, f"{shard_name(shard)}.tar")


def index_uri(root: str, shard: int) -> str:
    return storage.join(root, INDEX_DIR, f"{shard_name(shard)}.parquet")


def sidecar_dir(root: str, stage: str) -> str:
    return storage.join(root, stage)


def sidecar_uri(root: str, stage: str, shard: int) -> str:
    """``<root>/<stage>/part-<shard>.parquet``: the sidecar part of one shard."""
    return storage.join(root, stage, f"part-{shard_name(shard)}.parquet")
