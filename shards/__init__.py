"""WebDataset shards, the per-sample index, storage (local and s3://) and ingest.

``Dataset``, ``DatasetError`` and ``Sample`` load lazily, so importing a light
module such as ``shards.errors`` does not pull in pyarrow.
"""
from __future__ import annotations

from typing import Any

from .storage import StorageError

__all__ = ["Dataset", "DatasetError", "Sample", "StorageError"]


def __getattr__(name: str) -> Any:
    if name in ("Dataset", "DatasetError", "Sample"):
        from . import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
