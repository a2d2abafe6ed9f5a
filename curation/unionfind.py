"""Connected components of an edge list with a vectorised union-find.

Hook-and-compress over numpy arrays: every round links the larger root of
each edge whose ends disagree to the smaller one (``np.minimum.at``), then
compresses paths by pointer jumping until every node points at its root.
Parents only ever decrease, so there are no cycles, and each round merges
at least one pair of components; in practice a handful of rounds suffice
even for millions of edges. No N x N structure, O(N + E) memory.
"""
from __future__ import annotations

import numpy as np


def connected_components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Component label of each of ``n`` nodes given edges ``src[i] -- dst[i]``.

    Returns (n,) int64: the smallest node id in each node's component, so
    labels are deterministic and a singleton is labelled with itself.
    """
    parent = np.arange(n, dtype=np.int64)
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    if len(src) != len(dst):
        raise ValueError(f"edge arrays differ in length: {len(src)} vs {len(dst)}")
    if len(src) and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= n):
        raise ValueError(f"edge endpoints must lie in [0, {n})")
    while len(src):
        pu, pv = parent[src], parent[dst]
        differ = pu != pv
        if not differ.any():
            break
        # Drop settled edges: later rounds only look at those still crossing components.
        src, dst, pu, pv = src[differ], dst[differ], pu[differ], pv[differ]
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))
        _compress(parent)
    _compress(parent)
    return parent


def _compress(parent: np.ndarray) -> None:
    """Pointer jumping in place until every node points at its root."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return
        parent[:] = grand


def component_sizes(labels: np.ndarray) -> np.ndarray:
    """Size of each node's component: (n,) int64."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse]


class UnionFind:
    """Incremental union-find with path halving and union by size (small inputs, tests)."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return True
