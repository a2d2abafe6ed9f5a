"""Relative dedup: pool samples near another dataset (an eval set), as Ray tasks over the pool's parts.

The other datasets are small: their vectors are read once in the driver and
broadcast; each pool part finds its rows' best cosine to them (``hits_task``)
and returns only the rows above the threshold. A hit takes its whole
near-duplicate component of the pool graph with it (DINOv2's recipe), named
by the component's strongest hit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .components import components
from .dedup_graph import PartPlan, load
from .embedding_parts import EmbeddingSet, check_compatible, embedding_set, read_part
from .ray_tasks import map_tasks


@dataclass
class AgainstSet:
    """The broadcast side: vectors (S, D) float32 normalised, their keys and datasets."""

    vectors: np.ndarray
    keys: list[str]
    datasets: list[str]


def read_against(pool: EmbeddingSet, roots: list[str]) -> AgainstSet:
    """Every embedded vector of ``roots`` (checked to share the pool's embedding space)."""
    vecs, keys, names = [], [], []
    for root in roots:
        other = embedding_set(root, what="--against dataset")
        check_compatible(pool, other)
        for s in other.shards:
            p = read_part(root, s, other.dim)
            vecs.append(p.vectors)
            keys.extend(p.keys)
            names.extend([root] * len(p.rows))
    x = np.concatenate(vecs) if vecs else np.zeros((0, pool.dim), np.float32)
    return AgainstSet(x, keys, names)


def best_match(x: np.ndarray, against: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best cosine of each row of ``x`` to ``against`` and its index: (N,) float32, (N,) int64."""
    import faiss

    if len(against) == 0 or len(x) == 0:
        return np.full(len(x), -np.inf, np.float32), np.full(len(x), -1, np.int64)
    index = faiss.IndexFlatIP(against.shape[1])
    index.add(np.ascontiguousarray(against))
    s, i = index.search(np.ascontiguousarray(x), 1)
    return s[:, 0], i[:, 0]


def hits_task(shard: int, *, root: str, dim: int, against: np.ndarray, threshold: float, offset: int,
              exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool rows of one part whose best cosine to the other datasets is above ``threshold``: (gid, sim, index)."""
    _, gid, x = load(root, shard, dim, offset, exclude)
    s, i = best_match(x, against)
    hit = s > threshold
    return gid[hit], s[hit], i[hit]


def find_hits(plan: PartPlan, against: AgainstSet, threshold: float, memory: int) -> tuple[np.ndarray, ...]:
    """``(gid, sim, against index)`` of every pool row above ``threshold``."""
    got: list[tuple] = []
    map_tasks(hits_task, plan.shards, kwargs={"root": plan.root, "dim": plan.dim, "against": against.vectors,
                                              "threshold": threshold},
              per_item={s: {**plan.part_args(s), "exclude": np.zeros(0, np.int64)} for s in plan.shards},
              desc="against", memory=memory, on_result=lambda _, r: got.append(r))
    cat = [np.concatenate([g[i] for g in got]) if got else np.zeros(0) for i in range(3)]
    return cat[0].astype(np.int64), cat[1].astype(np.float32), cat[2].astype(np.int64)


def against_components(src: np.ndarray, dst: np.ndarray, hit_gid: np.ndarray,
                       hit_sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows dropped with a hit's component and the hit that names each: ``(gid, naming hit's position)``."""
    nodes, labels = components(src, dst, extra_nodes=hit_gid)
    at = np.searchsorted(nodes, hit_gid)
    strongest = np.full(int(labels.max()) + 1 if len(labels) else 0, -1, dtype=np.int64)
    order = np.argsort(-hit_sim, kind="stable")
    comp = labels[at[order]]
    _, first = np.unique(comp, return_index=True)  # each component's strongest hit
    strongest[comp[first]] = order[first]
    dropped = strongest[labels] >= 0
    via = strongest[labels[dropped]]
    own = np.full(len(nodes), -1, dtype=np.int64)
    own[at] = np.arange(len(hit_gid))
    via = np.where(own[dropped] >= 0, own[dropped], via)  # a hit is named by itself
    return nodes[dropped], via
