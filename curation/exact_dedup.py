"""Exact duplicates (same sha256) across a dataset, as Ray tasks over the index parts.

Pass 1 (one task per shard) reads the shard's ok index rows and splits them
into ``buckets`` by the sha256 prefix; pass 2 (one task per bucket) groups
equal hashes and keeps each group's best-ranked sample. A bucket holds about
N / buckets rows of ~120 bytes, so ``buckets`` follows ``--memory-per-task``;
the driver only sees the per-shard row counts and the dropped samples.

Keep policy (``rank_order``): ``largest`` = most pixels, then most bytes (the
better re-encode), then the smallest key; ``first`` = the smallest key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .embedding_parts import IndexPart, read_index_part

KEEP_POLICIES = ("largest", "first")
ROW_BYTES = 120  # sha hex + key + ranks, per row in a bucket


def rank_order(keys: list[str], pixels: np.ndarray, nbytes: np.ndarray, policy: str) -> np.ndarray:
    """Indices of the rows best-first under ``policy`` (stable, deterministic)."""
    key_rank = np.argsort(np.argsort(np.array(keys, dtype=object), kind="stable"), kind="stable")
    if policy == "first":
        return np.argsort(key_rank, kind="stable")
    return np.lexsort((key_rank, -np.asarray(nbytes, np.float64), -np.asarray(pixels, np.float64)))


def rank_of(keys: list[str], pixels: np.ndarray, nbytes: np.ndarray, policy: str) -> np.ndarray:
    """(n,) int64 preference rank of each row, 0 = kept first."""
    order = rank_order(keys, pixels, nbytes, policy)
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys))
    return rank


def buckets_for(rows: int, memory: int) -> int:
    """How many hash buckets keep one bucket task within ``memory`` (a quarter of it for the rows)."""
    return max(1, math.ceil(rows * ROW_BYTES * 4 / memory))


def index_task(shard: int, *, root: str, buckets: int) -> tuple:
    """Pass 1: ``(ok row count, bucket_0, ..., bucket_{B-1})`` of one shard (rows with a sha256 only)."""
    part = read_index_part(root, shard)
    sha = part.sha256
    have = np.array([bool(h) for h in sha], dtype=bool)
    rows = np.flatnonzero(have)
    bucket = np.array([int(sha[i][:8], 16) % buckets for i in rows], dtype=np.int64) if len(rows) else rows
    out = []
    for b in range(buckets):
        r = rows[bucket == b]
        out.append({"shard": np.full(len(r), shard, np.int64), "row": r, "sha": [sha[i] for i in r],
                    "key": [part.keys[i] for i in r], "pixels": part.pixels[r], "nbytes": part.nbytes[r]})
    return (len(part.keys), *out)


@dataclass
class ExactDuplicates:
    """Dropped rows and the kept row of their group: (shard, row) pairs and the kept key."""

    shard: np.ndarray
    row: np.ndarray
    keep_shard: np.ndarray
    keep_row: np.ndarray
    keep_key: list[str]

    def __len__(self) -> int:
        return len(self.row)


def bucket_task(bucket: int, *, parts: list, policy: str) -> ExactDuplicates:
    """Pass 2: in one bucket, every sample whose sha256 an earlier-ranked one has, with that one."""
    import ray

    chunks = [c for c in ray.get(parts) if len(c["row"])]
    if not chunks:
        return ExactDuplicates(*(np.zeros(0, np.int64),) * 4, [])
    shard = np.concatenate([c["shard"] for c in chunks])
    row = np.concatenate([c["row"] for c in chunks])
    sha = np.array([h for c in chunks for h in c["sha"]], dtype=object)
    keys = [k for c in chunks for k in c["key"]]
    order = rank_order(keys, np.concatenate([c["pixels"] for c in chunks]),
                       np.concatenate([c["nbytes"] for c in chunks]), policy)
    by_sha = order[np.argsort(sha[order], kind="stable")]  # grouped by hash, best first inside a group
    first = np.r_[True, sha[by_sha][1:] != sha[by_sha][:-1]]
    head = by_sha[np.maximum.accumulate(np.where(first, np.arange(len(by_sha)), 0))]
    dropped = ~first
    d, k = by_sha[dropped], head[dropped]
    return ExactDuplicates(shard[d], row[d], shard[k], row[k], [keys[i] for i in k])


def find_exact(root: str, shards: list[int], *, policy: str, buckets: int, memory: int | None,
               with_duplicates: bool = True) -> tuple[dict[int, int], ExactDuplicates]:
    """``({shard: ok rows}, exact duplicates)`` of the dataset; duplicates empty unless ``with_duplicates``."""
    from .ray_tasks import map_tasks

    b = buckets if with_duplicates else 1
    refs = map_tasks(index_task, shards, kwargs={"root": root, "buckets": b}, desc="index", memory=memory,
                     num_returns=b + 1, keep_refs=True)
    import ray

    counts = dict(zip(shards, ray.get([refs[s][0] for s in shards])))
    if not with_duplicates:
        return counts, ExactDuplicates(*(np.zeros(0, np.int64),) * 4, [])
    per_bucket = {i: {"parts": [refs[s][1 + i] for s in shards]} for i in range(b)}
    found = map_tasks(bucket_task, range(b), kwargs={"policy": policy}, per_item=per_bucket, desc="exact",
                      memory=memory)
    groups = [found[i] for i in range(b)]
    return counts, ExactDuplicates(
        np.concatenate([g.shard for g in groups]), np.concatenate([g.row for g in groups]),
        np.concatenate([g.keep_shard for g in groups]), np.concatenate([g.keep_row for g in groups]),
        [k for g in groups for k in g.keep_key])


def exact_in_index(part: IndexPart, policy: str) -> np.ndarray:
    """For one in-memory index part: the row each row duplicates (-1 when kept). For tests and benches."""
    order = rank_order(part.keys, part.pixels, part.nbytes, policy)
    out = np.full(len(part.keys), -1, dtype=np.int64)
    best: dict[str, int] = {}
    for i in order:
        h = part.sha256[i]
        if h:
            out[i] = best.setdefault(h, int(i))
            if out[i] == i:
                out[i] = -1
    return out
