"""Reading the ``embeddings`` sidecar one part at a time, checked against the index.

No stage holds every vector: tasks read one shard's part (float16 on disk)
with ``read_part``, which

- keeps only rows that are ``ok`` in the part *and* ``ok`` in the shard's index
  (keys the index does not know are counted in ``unknown`` and reported, never
  used: a sample cannot pick or export a key that is not in the dataset);
- counts failed, all-zero and constant vectors as missing embeddings (a
  collapsed backbone must not merge a shard into one duplicate group), and
  leaves out the samples ``webcurate filter`` removed;
- refuses NaN/inf vectors and a dimension other than the stage's, naming the
  part and keys, and turns an unreadable part into one line naming its file.

``EmbeddingSet`` describes a dataset's embeddings without loading them:
model, dim, weights, image size and run id (the fingerprint downstream
stages record), and which shards hold parts.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from webcurate.shards.errors import DatasetError

STAGE = "embeddings"


class EmbeddingError(DatasetError):
    """Embeddings are missing, malformed, NaN, or incompatible with each other."""


@dataclass
class IndexPart:
    """The ``ok`` rows of one shard's index: keys (n,) and what the keep policy ranks by."""

    shard: int
    keys: list[str]
    pixels: np.ndarray  # (n,) float64 width x height, 0 when unknown
    nbytes: np.ndarray  # (n,) float64 encoded size, 0 when unknown
    sha256: list[str | None]


@dataclass
class Part:
    """One shard's usable embeddings.

    rows: (m,) int64 position of each vector's key among the shard's ok index
    rows (``IndexPart.keys``); vectors: (m, D) float32, L2-normalised
    (``normalized(stored)``).
    missing: ok index rows without a usable embedding; unknown: embedded keys
    the index does not list as ok (left out); degenerate: zero/constant
    vectors; filtered: samples ``webcurate filter`` removed (left out too).
    """

    shard: int
    index: IndexPart
    rows: np.ndarray
    vectors: np.ndarray
    stored: np.ndarray  # the same rows as stored (float16 or float32), for shipping to other tasks
    missing: int = 0
    unknown: int = 0
    unknown_examples: list[str] = field(default_factory=list)
    degenerate: int = 0
    filtered: int = 0  # removed by the dataset's `webcurate filter`

    @property
    def keys(self) -> list[str]:
        return [self.index.keys[i] for i in self.rows]


def read_index_part(root: str, shard: int) -> IndexPart:
    """The ok rows of shard ``shard``'s index, in index order."""
    import pyarrow.compute as pc

    from webcurate.shards.dataset import Dataset

    t = Dataset(root).read_index(shard)
    if "status" in t.column_names:
        t = t.filter(pc.equal(t["status"], "ok"))
    n = t.num_rows

    def col(name: str) -> np.ndarray:
        if name not in t.column_names:
            return np.zeros(n)
        return np.nan_to_num(np.asarray(t[name].to_numpy(zero_copy_only=False), dtype=np.float64))

    sha = t["sha256"].to_pylist() if "sha256" in t.column_names else [None] * n
    return IndexPart(int(shard), t["key"].to_pylist(), col("width") * col("height"), col("bytes"), sha)


def _read_table(root: str, shard: int, sidecar: str = STAGE):
    from webcurate.shards import layout, storage

    uri = layout.sidecar_uri(root, sidecar, shard)
    try:
        t = storage.read_parquet(uri, columns=["key", "embedding", "status"])
    except FileNotFoundError:
        raise EmbeddingError(f"{uri} is missing; re-run `webcurate embed --input {root}`") from None
    except Exception as e:  # noqa: BLE001 - a garbage file: say which one, not a traceback
        raise EmbeddingError(f"{uri} is not a readable embeddings part ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''}); delete it and re-run "
                             f"`webcurate embed --input {root}`") from None
    import pyarrow as pa

    typ = t.schema.field("embedding").type
    if not (pa.types.is_fixed_size_list(typ) and pa.types.is_floating(typ.value_type)):
        raise EmbeddingError(f"{uri}: column `embedding` is {typ}, not a fixed-size list of floats; "
                             f"delete it and re-run `webcurate embed --input {root}`")
    return t, uri


def normalized(stored: np.ndarray) -> np.ndarray:
    """Stored vectors (float16/32) -> float32 L2-normalised rows; the same bits wherever it runs."""
    x = np.array(stored, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # float16 storage loses a little
    return x


def mismatch_counts(part: "Part") -> dict[str, int]:
    """The part's embeddings left out for not matching the index or being degenerate (stage counts)."""
    out = {"embeddings_unknown_key": part.unknown, "embeddings_degenerate": part.degenerate}
    return {k: v for k, v in out.items() if v}


def mismatch_warning(totals: dict[str, int], root: str) -> str | None:
    """One line for a stage summary when embeddings were left out for keys the index does not list."""
    n = int(totals.get("embeddings_unknown_key", 0))
    if not n:
        return None
    return (f"{n} embeddings of {root} carry keys its index does not list as ok; they were left out (re-embed "
            "the dataset if its shards changed after `webcurate embed`)")


def degenerate_rows(x: np.ndarray) -> np.ndarray:
    """(n,) bool: rows that are all zero or constant across dimensions (no information)."""
    if x.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    return np.ptp(x, axis=1) <= 1e-6 * np.maximum(np.abs(x).max(axis=1), 1e-30)


def read_part(root: str, shard: int, dim: int | None = None, index: IndexPart | None = None,
              sidecar: str = STAGE) -> Part:
    """Shard ``shard``'s usable embeddings of dataset ``root``, checked (see the module docstring).

    ``sidecar``: another table of the same schema (``pixels``: pixel copy descriptors).
    """
    import pyarrow.compute as pc

    index = index if index is not None else read_index_part(root, shard)
    t, uri = _read_table(root, shard, sidecar)
    d = t.schema.field("embedding").type.list_size
    if dim is not None and d != dim:
        raise EmbeddingError(f"{uri} holds {d}-d embeddings, the rest of {root} {dim}-d; "
                             f"re-embed the dataset with one model")
    ok = pc.and_(pc.equal(t["status"], "ok"), pc.is_valid(t["embedding"]))
    t_ok = t.filter(ok)
    keys = t_ok["key"].to_pylist()
    col = t_ok["embedding"].combine_chunks()
    stored = np.asarray(col.flatten().to_numpy(zero_copy_only=False)).reshape(-1, d)
    x = stored.astype(np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        examples = ", ".join(keys[i] for i in np.flatnonzero(bad)[:5])
        raise EmbeddingError(f"{uri}: {int(bad.sum())} embeddings hold NaN/inf (e.g. keys {examples}); "
                             "re-embed the dataset (delete its embeddings/ folder first)")
    pos = {k: i for i, k in enumerate(index.keys)}
    rows = np.fromiter((pos.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
    known = rows >= 0
    unknown = [keys[i] for i in np.flatnonzero(~known)[:3]]
    degen = degenerate_rows(x)
    from .filter import removed_in_shard

    removed = removed_in_shard(root, shard)  # `webcurate filter` decisions: no later stage uses these
    filtered = np.fromiter((k in removed for k in keys), dtype=bool, count=len(keys)) if removed else known & False
    use = known & ~degen & ~filtered
    rows, stored = rows[use], np.ascontiguousarray(stored[use])
    return Part(int(shard), index, rows, normalized(stored), stored, missing=len(index.keys) - int(use.sum()),
                unknown=int((~known).sum()), unknown_examples=unknown, degenerate=int((known & degen).sum()),
                filtered=int((known & filtered).sum()))


@dataclass
class EmbeddingSet:
    """A dataset's embeddings, described without loading them (see the module docstring)."""

    root: str
    shards: list[int]
    info: dict[str, Any]
    filter_run: str | None = None  # the `webcurate filter` run whose removals are left out

    @property
    def dim(self) -> int:
        return int(self.info.get("dim") or 0)

    @property
    def model(self) -> str | None:
        return self.info.get("model")

    @property
    def image_size(self) -> int | None:
        v = self.info.get("image_size")
        return int(v) if v else None

    @property
    def rows(self) -> int:
        """Embedded samples recorded by the embed stage (ok ones)."""
        counts = self.info.get("counts") or {}
        return int(counts.get("ok", counts.get("total", 0)))

    def fingerprint(self) -> dict[str, Any]:
        """What identifies these embeddings in downstream stage parameters (a new filter run changes it)."""
        fp = {"model": self.model, "weights_sha256": self.info.get("weights_sha256"), "dim": self.dim,
              "image_size": self.image_size, "run": self.info.get("run"), "shards": len(self.shards)}
        if self.filter_run:
            fp["filter"] = self.filter_run
        return fp


def embedding_set(root: str, what: str = "dataset") -> EmbeddingSet:
    """The embeddings of ``root``; ``EmbeddingError`` when there are none or some shards lack a part."""
    from webcurate.shards.dataset import Dataset

    ds = Dataset(root)
    shards = ds.completed_shards()
    done = set(ds.sidecar_completed(STAGE))
    info = dict(ds.manifest.get("stages", {}).get(STAGE, {}))
    if not done:
        raise EmbeddingError(
            f"{what} {root} has no embeddings; run `webcurate embed --input {root} --model NAME ...` first")
    missing = [s for s in shards if s not in done]
    if missing:
        raise EmbeddingError(
            f"{what} {root}: {len(missing)} of {len(shards)} shards are not embedded yet "
            f"(e.g. {', '.join(f'{s:05d}' for s in missing[:5])}); re-run `webcurate embed` on it to finish")
    if not info.get("dim"):
        info["dim"] = _part_dim(root, shards[0])
    from webcurate.shards.global_stage import stage_run

    return EmbeddingSet(ds.root, shards, info, stage_run(ds.root, "filter"))


def _part_dim(root: str, shard: int) -> int:
    t, _ = _read_table(root, shard)
    return int(t.schema.field("embedding").type.list_size)


def check_compatible(a: EmbeddingSet, b: EmbeddingSet) -> None:
    """Refuse embeddings from different spaces (dim, model or weights); warn on another image size.

    The same weights at another input size give related but shifted vectors:
    cosines between the two sets read lower than within either.
    """
    if a.dim != b.dim:
        raise EmbeddingError(
            f"embedding dimensions differ: {a.root} has {a.dim}-d ({a.model}), {b.root} has {b.dim}-d "
            f"({b.model}); embed both with the same --model and weights")
    wa, wb = a.info.get("weights_sha256"), b.info.get("weights_sha256")
    if a.model != b.model or (wa and wb and wa != wb):
        raise EmbeddingError(
            f"embeddings come from different models: {a.root} from {a.model} (weights {str(wa)[:19]}), "
            f"{b.root} from {b.model} (weights {str(wb)[:19]}); embed both with the same --model and weights")
    if a.image_size and b.image_size and a.image_size != b.image_size:
        warnings.warn(f"{b.root} was embedded at {b.image_size}px, {a.root} at {a.image_size}px: similarities "
                      f"between them read lower; re-embed one with --image-size {a.image_size}", stacklevel=3)


@dataclass
class Embeddings:
    """All usable embeddings of a small dataset in memory (tests, benches, seed sets).

    keys: N keys; shards: (N,) int32; vectors: (N, D) float32 normalised;
    filtered: samples ``webcurate filter`` removed (left out).
    """

    root: str
    keys: list[str]
    shards: np.ndarray
    vectors: np.ndarray
    info: dict[str, Any]
    filtered: int
    source: EmbeddingSet

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def fingerprint(self) -> dict[str, Any]:
        return self.source.fingerprint()


def read_embeddings(root: str, what: str = "dataset") -> Embeddings:
    """Every usable embedding of ``root`` at once, part by part (for datasets that fit in memory)."""
    emb = embedding_set(root, what)
    parts = [read_part(root, s, emb.dim) for s in emb.shards]
    x = np.concatenate([p.vectors for p in parts]) if parts else np.zeros((0, emb.dim), np.float32)
    return Embeddings(emb.root, [k for p in parts for k in p.keys],
                      np.concatenate([np.full(len(p.rows), p.shard, np.int32) for p in parts]) if parts
                      else np.zeros(0, np.int32), x, emb.info, sum(p.filtered for p in parts), emb)
