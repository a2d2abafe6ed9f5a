"""Connected components of an edge list and the member each component keeps.

Nodes are global sample ids (int64, any range); only nodes that appear in an
edge are materialised, so memory is O(E), whatever N is. Components come
from ``scipy.sparse.csgraph.connected_components``.
"""
from __future__ import annotations

import numpy as np


def components(src: np.ndarray, dst: np.ndarray, extra_nodes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(nodes, labels)``: the sorted unique endpoints (plus ``extra_nodes``) and their component label.

    Labels are 0..C-1, numbered by each component's smallest node, so they are deterministic.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    if len(src) != len(dst):
        raise ValueError(f"edge arrays differ in length: {len(src)} vs {len(dst)}")
    parts = [src, dst] + ([np.asarray(extra_nodes, dtype=np.int64)] if extra_nodes is not None else [])
    nodes = np.unique(np.concatenate(parts)) if any(len(p) for p in parts) else np.zeros(0, np.int64)
    n = len(nodes)
    if n == 0:
        return nodes, np.zeros(0, np.int64)
    a, b = np.searchsorted(nodes, src), np.searchsorted(nodes, dst)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, raw = connected_components(graph, directed=False)
    # Renumber by first appearance in node order: label = rank of the component's smallest node.
    _, first = np.unique(raw, return_index=True)
    order = np.argsort(first, kind="stable")
    relabel = np.empty(len(order), dtype=np.int64)
    relabel[order] = np.arange(len(order))
    return nodes, relabel[raw]


def best_member(labels: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For each node, the position of its component's best-ranked node (lowest ``rank``): (n,) int64."""
    n = len(labels)
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((rank, labels))  # by component, best first
    first = np.r_[True, labels[order][1:] != labels[order][:-1]]
    best_of = np.empty(int(labels.max()) + 1, dtype=np.int64)
    best_of[labels[order][first]] = order[first]
    return best_of[labels]


def size_histogram(labels: np.ndarray, singletons: int = 0) -> list[tuple[str, int]]:
    """Components by size bucket (1, 2, 3-5, 6-10, 11-100, 101-1000, >1000): ``[(bucket, count)]``.

    ``singletons``: nodes outside every edge (components of size 1).
    """
    sizes = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    edges = [(1, 1), (2, 2), (3, 5), (6, 10), (11, 100), (101, 1000), (1001, None)]
    out = []
    for lo, hi in edges:
        sel = (sizes >= lo) & (sizes <= (hi if hi is not None else np.iinfo(np.int64).max))
        count = int(sel.sum()) + (singletons if lo == 1 else 0)
        out.append((f"{lo}" if lo == hi else (f"{lo}-{hi}" if hi else f">{lo - 1}"), count))
    return out


def keep_one_per_component(n: int, src: np.ndarray, dst: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For ``n`` nodes 0..n-1 and their edges: the kept node each dropped node maps to, -1 if kept: (n,) int64.

    The best-ranked node (lowest ``rank``, (n,)) of each component is kept. For
    arrays in one process (tests, benches); the stage does the same over gids.
    """
    nodes, labels = components(src, dst)
    out = np.full(n, -1, dtype=np.int64)
    keeper = nodes[best_member(labels, np.asarray(rank)[nodes])]
    drop = keeper != nodes
    out[nodes[drop]] = keeper[drop]
    return out
