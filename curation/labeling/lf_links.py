"""Links between LFs that copy each other: the label model's dependency forest.

Two LFs depend on each other beyond what the latent class explains when
their observed joint vote table differs from the one the fitted model
implies. ``find_links`` tests every pair not yet in one tree with a G-test
(BIC threshold plus a minimum effect size) and adds the strongest misfits
first, keeping a forest; ``orient_forest`` roots each tree at its widest
covering LF so that LF carries the shared evidence, and the label model then
models each child conditionally on its parent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from graphlib import TopologicalSorter

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components


@dataclass
class Dependency:
    """A learned link: ``child`` is modelled conditionally on ``parent``."""

    child: int
    parent: int
    kl: float  # per-item KL (nats) of the pair's observed vs modelled joint votes when found
    found_in_round: int


def _graph(m: int, edges: list[tuple[int, int]]):
    rows = [a for a, _ in edges]
    cols = [b for _, b in edges]
    return coo_matrix((np.ones(len(edges)), (rows, cols)), shape=(m, m)).tocsr()


def components(m: int, edges: list[tuple[int, int]]) -> np.ndarray:
    """(m,) component label of each LF in the undirected graph of ``edges``."""
    return connected_components(_graph(m, edges), directed=False)[1]


def orient_forest(m: int, edges: list[tuple[int, int]], root_score: np.ndarray) -> list[int]:
    """Parent of each node (-1 for roots) of the forest given by undirected ``edges``.

    Each tree is rooted at its node with the largest ``root_score``
    (coverage), ties to the lower index. In a tree the parents follow from
    the root alone, so the traversal order does not matter.
    """
    graph = _graph(m, edges)
    comp = connected_components(graph, directed=False)[1]
    parents = [-1] * m
    for c in np.unique(comp):
        nodes = np.flatnonzero(comp == c)
        root = int(min(nodes, key=lambda i: (-root_score[i], i)))
        _, pred = breadth_first_order(graph, root, directed=False, return_predecessors=True)
        for j in nodes:
            if j != root:
                parents[int(j)] = int(pred[j])
    return parents


def topological(parents: list[int]) -> list[int]:
    """Nodes ordered so every parent comes before its children."""
    ts = TopologicalSorter({j: ([p] if p >= 0 else []) for j, p in enumerate(parents)})
    return list(ts.static_order())


def pair_misfits(U: np.ndarray, w: np.ndarray, P: np.ndarray, pi: np.ndarray, comp: np.ndarray,
                 min_dependency: float) -> list[tuple[float, int, int]]:
    """Pairs (kl, a, b) whose joint votes the model explains badly, strongest first.

    ``U``: (u, m) votes with row weights ``w`` (u,); ``P``: (m, K+1, K) the
    model's ``P(L_j = v | Y = y)``; ``pi``: (K,) class balance; ``comp``:
    pairs within one component are skipped. The observed joint table
    O[u, v] of a pair is compared with E[u, v] = sum_y pi_y P(L_a=u|y)
    P(L_b=v|y); a pair is a misfit when N * KL(O||E) beats the BIC cost of
    the extra parameters and KL exceeds ``min_dependency``.
    """
    m = U.shape[1]
    K = len(pi)
    K1 = K + 1
    N = float(w.sum())
    Lp = np.ascontiguousarray(U.T, dtype=np.int64) + 1
    unweighted = bool(np.all(w == 1.0))
    extra_params = K * K1 * K - K * K  # (u, y) rows of K free values vs y rows
    bic = 0.5 * extra_params * math.log(max(N, 2.0))
    cands: list[tuple[float, int, int]] = []
    for a in range(m):
        base = Lp[a] * K1
        for b in range(a + 1, m):
            if comp[a] == comp[b]:
                continue
            code = base + Lp[b]
            O = (np.bincount(code, minlength=K1 * K1) if unweighted else
                 np.bincount(code, weights=w, minlength=K1 * K1)) / N
            E = np.einsum("y,uy,vy->uv", pi, P[a], P[b]).reshape(-1)
            nz = O > 0
            kl = float(np.sum(O[nz] * np.log(O[nz] / np.maximum(E[nz], 1e-300))))
            if kl > min_dependency and N * kl > bic:
                cands.append((kl, a, b))
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    return cands


def find_links(U: np.ndarray, w: np.ndarray, P: np.ndarray, pi: np.ndarray, known: list[Dependency],
               rnd: int, *, min_dependency: float, sample: int) -> list[Dependency]:
    """New links for round ``rnd``: the strongest misfits that keep the graph a forest.

    More than ``sample`` rows are tested on a deterministic weighted
    subsample: the pair tables are estimated well from it.
    """
    m = U.shape[1]
    if U.shape[0] > sample:
        pick = np.random.default_rng(0).choice(U.shape[0], sample, replace=False, p=w / w.sum())
        U, w = U[np.sort(pick)], np.ones(sample)
    edges = [(d.child, d.parent) for d in known]
    comp = components(m, edges)
    links = []
    for kl, a, b in pair_misfits(U, w, P, pi, comp, min_dependency):
        if comp[a] == comp[b]:
            continue
        edges.append((a, b))
        comp = components(m, edges)
        links.append(Dependency(child=b, parent=a, kl=kl, found_in_round=rnd))
    return links
