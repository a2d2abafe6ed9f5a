"""The label matrix every label model reads: validation, row compression, deterministic argmax.

A label matrix ``L`` is (n items, m LFs) of ints in {-1 (abstain), 0..K-1}.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from webcurate.shards.errors import ConfigError

from .lf import ABSTAIN


class LabelModelError(ConfigError):
    """The label matrix cannot be used (bad values, nothing voted)."""


def check_label_matrix(L: np.ndarray, cardinality: int, lf_names: Sequence[str] | None = None) -> np.ndarray:
    """Validate an (n, m) label matrix; returns it as int16.

    Raises ``LabelModelError`` naming the LF whose column holds a value
    outside [-1, K-1], or saying that every LF abstained on every item.
    """
    L = np.asarray(L)
    if L.ndim != 2:
        raise LabelModelError(f"label matrix must be 2-D (items x LFs), got shape {L.shape}")
    if L.shape[1] == 0:
        raise LabelModelError("label matrix has no LF columns")
    if not np.issubdtype(L.dtype, np.integer):
        if np.issubdtype(L.dtype, np.floating) and np.all(np.isfinite(L)) and np.all(L == np.round(L)):
            L = L.astype(np.int64)
        else:
            raise LabelModelError(f"label matrix must hold integers, got {L.dtype}")
    names = list(lf_names) if lf_names is not None else [f"LF {j}" for j in range(L.shape[1])]
    if len(names) != L.shape[1]:
        raise LabelModelError(f"{len(names)} LF names for {L.shape[1]} label-matrix columns")
    if L.size:
        lo, hi = L.min(axis=0), L.max(axis=0)
        for j in range(L.shape[1]):
            if lo[j] < ABSTAIN or hi[j] >= cardinality:
                bad = lo[j] if lo[j] < ABSTAIN else hi[j]
                raise LabelModelError(
                    f"LF `{names[j]}` has vote {int(bad)}, outside [-1, {cardinality - 1}] for {cardinality} classes")
    if L.shape[0] and not np.any(L != ABSTAIN):
        raise LabelModelError(f"all {L.shape[1]} LFs abstain on all {L.shape[0]} items: nothing to learn from")
    return L.astype(np.int16, copy=False)


def compress_rows(L: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique rows of L: (unique (u, m), counts (u,), inverse (n,))."""
    n, m = L.shape
    if n == 0:
        return L, np.zeros(0), np.zeros(0, dtype=np.int64)
    # A random 64-bit hash per row (wrapping arithmetic) is much faster than
    # np.unique(axis=0); a collision is checked for and falls back.
    rng = np.random.default_rng(12345)
    mult = rng.integers(1, 2**62, size=m, dtype=np.int64) | 1
    h = (L.astype(np.int64) + 2) @ mult
    _, first, inverse, counts = np.unique(h, return_index=True, return_inverse=True, return_counts=True)
    U = L[first]
    if not np.array_equal(U[inverse], L):  # pragma: no cover - astronomically rare
        U, inverse, counts = np.unique(L, axis=0, return_inverse=True, return_counts=True)
    return U, counts.astype(np.float64), inverse.reshape(-1)


def worth_compressing(L: np.ndarray, sample: int = 20_000) -> bool:
    """True when rows repeat enough for fitting unique rows to pay off,
    judged on a deterministic sample (many LFs x many items rarely repeat)."""
    n = L.shape[0]
    if n <= sample:
        return True
    rows = L[np.random.default_rng(0).choice(n, sample, replace=False)]
    return len(np.unique(rows, axis=0)) < 0.5 * sample


def argmax_ties(P: np.ndarray, prior: np.ndarray | None = None, tol: float = 1e-12) -> np.ndarray:
    """Row-wise argmax of (n, K) scores with deterministic ties.

    Among classes within ``tol`` of the row maximum, the one with the larger
    ``prior`` wins, then the lowest class index.
    """
    if P.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    mx = P.max(axis=1, keepdims=True)
    tied = P >= mx - tol
    if prior is None:
        return np.argmax(tied, axis=1)
    # Rank classes by prior (desc) then index; pick the best-ranked tied class.
    order = np.lexsort((np.arange(len(prior)), -np.asarray(prior)))
    rank = np.empty(len(prior), dtype=np.int64)
    rank[order] = np.arange(len(prior))
    score = np.where(tied, -rank[None, :], np.iinfo(np.int64).min)
    return np.argmax(score, axis=1)


def vote_counts(L: np.ndarray, cardinality: int) -> np.ndarray:
    """(n, K) number of LFs voting each class per item."""
    counts = np.zeros((L.shape[0], cardinality))
    for y in range(cardinality):
        counts[:, y] = (L == y).sum(axis=1)
    return counts
