"""Exact duplicates (same sha256) across a dataset, as Ray tasks over the index parts.

Pass 1 (one task per run of shards) reads the ok index rows and splits them
into ``buckets`` by the sha256 prefix, one scratch file per task (scratch.py);
pass 2 (one task per bucket) reads its batch of every file, groups equal
hashes and keeps each group's best-ranked sample. A bucket holds about
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


def index_task(block: int, *, shards: list[int], root: str, buckets: int, out: str | None) -> dict[int, int]:
    """Pass 1 over a block of shards: write its rows with a sha256 to ``out``, batch b = bucket b (by the
    sha256 prefix); return ``{shard: ok row count}``."""
    from . import scratch

    counts: dict[int, int] = {}
    cols: dict[str, list] = {"shard": [], "row": [], "sha": [], "key": [], "pixels": [], "nbytes": []}
    for shard in shards:
        part = read_index_part(root, shard)
        counts[shard] = len(part.keys)
        rows = np.flatnonzero(np.array([bool(h) for h in part.sha256], dtype=bool))
        for name, v in (("shard", np.full(len(rows), shard, np.int64)), ("row", rows),
                        ("sha", np.array(part.sha256, dtype=object)[rows]),
                        ("key", np.array(part.keys, dtype=object)[rows]),
                        ("pixels", np.asarray(part.pixels)[rows]), ("nbytes", np.asarray(part.nbytes)[rows])):
            cols[name].append(v)
    if out is not None and shards:
        cat = {k: np.concatenate(v) for k, v in cols.items()}
        bucket = np.array([int(h[:8], 16) % buckets for h in cat["sha"]], dtype=np.int64)
        scratch.write_batches(out, [{k: v[bucket == b] for k, v in cat.items()} for b in range(buckets)])
    return counts


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


def bucket_task(bucket: int, *, parts: list[str], policy: str) -> ExactDuplicates:
    """Pass 2: in one bucket (batch ``bucket`` of every block's file), every sample whose sha256 an
    earlier-ranked one has, with that one."""
    from . import scratch

    chunks = list(scratch.read_batches(parts, bucket))
    if not chunks:
        return ExactDuplicates(*(np.zeros(0, np.int64),) * 4, [])
    shard = np.concatenate([c["shard"] for c in chunks])
    row = np.concatenate([c["row"] for c in chunks])
    sha = np.concatenate([c["sha"] for c in chunks]).astype(object)
    keys = [k for c in chunks for k in c["key"].tolist()]
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
    """``({shard: ok rows}, exact duplicates)`` of the dataset; duplicates empty unless ``with_duplicates``.

    The buckets pass between the two steps through a scratch folder (scratch.py), not the driver.
    """
    from . import scratch
    from .ray_tasks import map_tasks, shard_blocks

    blocks = shard_blocks(list(shards))
    counts: dict[int, int] = {}
    with scratch.Scratch(root, "exact") as tmp:
        files = [tmp.file(f"{i:06d}.arrow") if with_duplicates else None for i in range(len(blocks))]
        map_tasks(index_task, range(len(blocks)), kwargs={"root": root, "buckets": buckets},
                  per_item={i: {"shards": blocks[i], "out": files[i]} for i in range(len(blocks))}, desc="index",
                  memory=memory, on_result=lambda _, c: counts.update(c))
        if not with_duplicates:
            return counts, ExactDuplicates(*(np.zeros(0, np.int64),) * 4, [])
        found = map_tasks(bucket_task, range(buckets), kwargs={"policy": policy, "parts": files}, desc="exact",
                          memory=memory)  # O(duplicates): the dropped rows come to the driver anyway
    groups = [found[i] for i in range(buckets)]
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
