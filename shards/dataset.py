"""Reading a dataset: manifest, shards, index, samples and sidecar tables."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import pyarrow as pa

from . import layout, manifest as manifest_mod, storage
from .errors import DatasetError
from .schema import STATUS_OK
from .tar_samples import IMAGE_EXTS, TarBroken, image_ext, iter_tar
from .writer import write_parquet

__all__ = ["Dataset", "DatasetError", "IMAGE_EXTS", "Sample"]


@dataclass
class Sample:
    """One sample read from a shard: image bytes, extension and json metadata."""

    key: str
    image: bytes
    ext: str
    meta: dict[str, Any] = field(default_factory=dict)
    caption: str | None = None


class Dataset:
    """A dataset root (folder or ``s3://`` prefix) following the data contract."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") if storage.is_s3(root) else root
        self._manifest: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"Dataset({self.root!r})"

    # -- manifest ---------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            m = manifest_mod.load(self.root)
            if m is None:
                raise DatasetError(
                    f"{self.root} is not a webcurate dataset (no {manifest_mod.MANIFEST_NAME}); "
                    "make one with `webcurate shard`"
                )
            self._manifest = m
        return self._manifest

    def reload(self) -> "Dataset":
        self._manifest = None
        return self

    def exists(self) -> bool:
        return manifest_mod.load(self.root) is not None

    # -- shards -------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return int(self.manifest.get("num_shards", 0))

    def shard_ids(self) -> list[int]:
        return list(range(self.num_shards))

    def completed_shards(self) -> list[int]:
        """Shards recorded complete whose index file exists."""
        _ = self.manifest  # a clear error when this is not a dataset
        recorded = set(manifest_mod.completed_ids(self.root))
        present = {
            int(e.name.split(".")[0])
            for e in storage.list_dir(storage.join(self.root, layout.INDEX_DIR))
            if e.name.endswith(".parquet") and e.name.split(".")[0].isdigit()
        }
        return sorted(recorded & present)

    def shard_uri(self, shard: int) -> str:
        files = self.manifest.get("shard_files")
        if files:  # adopted datasets keep their own tar names
            return storage.join(self.root, files[shard])
        return layout.shard_uri(self.root, shard)

    def shard_uris(self, only_complete: bool = True) -> list[str]:
        ids = self.completed_shards() if only_complete else self.shard_ids()
        return [self.shard_uri(s) for s in ids]

    # -- index --------------------------------------------------------------
    def read_index(self, shard: int, columns: list[str] | None = None) -> pa.Table:
        uri = layout.index_uri(self.root, shard)
        try:
            return storage.read_parquet(uri, columns)
        except FileNotFoundError as e:
            raise DatasetError(f"shard {shard} of {self.root} has no index ({uri})") from e

    def index(self, columns: list[str] | None = None, status: str | None = None) -> pa.Table:
        """The index of all completed shards, optionally only rows with ``status``."""
        tables = [self.read_index(s, columns=None if status and columns and "status" not in columns else columns)
                  for s in self.completed_shards()]
        if not tables:
            return pa.table({c: pa.array([], pa.string()) for c in (columns or ["key"])})
        table = pa.concat_tables(tables, promote_options="permissive")
        if status is not None:
            import pyarrow.compute as pc

            table = table.filter(pc.equal(table["status"], status))
            if columns:
                table = table.select(columns)
        return table

    # -- samples ------------------------------------------------------------
    def iter_samples(self, shard: int, keys: Iterable[str] | None = None) -> Iterator[Sample]:
        """Samples of one shard in tar order; only ``keys`` when given.

        Grouped as webdataset groups them (``shards.tar_samples``); a sample
        without an image is skipped, a tar that breaks off is a ``DatasetError``.
        """
        wanted = set(keys) if keys is not None else None
        uri = self.shard_uri(shard)
        for s in iter_tar(io.BytesIO(storage.read_bytes(uri)), max_member_bytes=1 << 40):
            if isinstance(s, TarBroken):
                raise DatasetError(f"{uri} is not a readable tar past sample {s.partial_key}: {s.error}")
            if wanted is not None and s.key not in wanted:
                continue
            ext = image_ext(s.files)
            if ext is None:
                continue
            meta = json.loads(s.files["json"]) if "json" in s.files else {}
            caption = s.files["txt"].decode("utf-8") if "txt" in s.files else meta.get("caption")
            yield Sample(key=s.key, image=s.files[ext], ext=ext, meta=meta, caption=caption)

    def ok_keys(self) -> list[str]:
        return self.index(columns=["key"], status=STATUS_OK)["key"].to_pylist()

    # -- sidecars -----------------------------------------------------------
    def sidecar_uri(self, stage: str, shard: int) -> str:
        return layout.sidecar_uri(self.root, stage, shard)

    def sidecar_completed(self, stage: str) -> list[int]:
        """Shards whose ``stage`` part is recorded complete (its completion object) and present."""
        self.reload()  # callers read the stage's manifest entry next: make it current
        recorded = set(manifest_mod.completed_ids(self.root, stage))
        present = {
            int(e.name[len("part-"):-len(".parquet")])
            for e in storage.list_dir(layout.sidecar_dir(self.root, stage))
            if e.name.startswith("part-") and e.name.endswith(".parquet")
        }
        return sorted(recorded & present)

    def write_sidecar(self, stage: str, shard: int, table: pa.Table) -> None:
        """Write one shard's part of a sidecar table atomically (driver records it)."""
        write_parquet(self.sidecar_uri(stage, shard), table)

    def read_sidecar_part(self, stage: str, shard: int, columns: list[str] | None = None) -> pa.Table:
        return storage.read_parquet(self.sidecar_uri(stage, shard), columns)

    def read_sidecar(self, stage: str, columns: list[str] | None = None) -> pa.Table:
        """All completed parts of sidecar ``stage`` concatenated (keyed by ``key``)."""
        parts = self.sidecar_completed(stage)
        if not parts:
            raise DatasetError(
                f"{self.root} has no `{stage}` table yet; run `webcurate {stage}` on it first"
            )
        return pa.concat_tables(
            [self.read_sidecar_part(stage, s, columns) for s in parts], promote_options="permissive"
        )
