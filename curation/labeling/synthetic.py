"""Generated label matrices with known LF accuracies, for tests and benchmarks.

The generator follows the usual weak-supervision setup: a true class per
item, LFs that vote with some coverage and accuracy (a wrong vote is uniform
over the other classes), and "copy" LFs that repeat another LF's output
(abstains included) on a fraction of the items, so the conditional
independence that simple label models assume is broken on purpose.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .lf import ABSTAIN


@dataclass
class SyntheticVotes:
    """A generated label matrix with its ground truth.

    ``L``: (n, m) int8 votes in {-1, 0..K-1}; ``y``: (n,) true classes;
    ``accuracies``/``coverages``: (m,) the effective per-LF values measured on
    the generated data (for copy LFs they include the copying);
    ``copies``: {copier LF index: source LF index}.
    """

    L: np.ndarray
    y: np.ndarray
    class_balance: np.ndarray
    accuracies: np.ndarray
    coverages: np.ndarray
    copies: dict[int, int] = field(default_factory=dict)


def make_votes(
    n: int = 20_000,
    class_balance: tuple[float, ...] = (0.4, 0.3, 0.2, 0.1),
    coverages: tuple[float, ...] | None = None,
    accuracies: tuple[float, ...] | None = None,
    copies: dict[int, int] | None = None,
    copy_rate: float = 0.8,
    num_lfs: int = 10,
    seed: int = 0,
) -> SyntheticVotes:
    """Generate votes for ``n`` items.

    Defaults are the benchmark of issue 5: 4 imbalanced classes, 10 LFs with
    coverage spread over 0.2-0.8 and accuracy over 0.55-0.9, LFs 8 and 9
    copying LFs 0 and 1 on 80 % of the items. ``copies`` maps a copier LF to
    the LF it copies; with ``copy_rate`` probability per item the copier
    outputs exactly what its source output (abstain included), otherwise its
    own independent vote.
    """
    rng = np.random.default_rng(seed)
    pi = np.asarray(class_balance, dtype=np.float64)
    pi = pi / pi.sum()
    k = len(pi)
    if coverages is None:
        coverages = tuple(rng.uniform(0.2, 0.8, size=num_lfs))
    if accuracies is None:
        accuracies = tuple(rng.uniform(0.55, 0.9, size=num_lfs))
    if copies is None:
        copies = {num_lfs - 2: 0, num_lfs - 1: 1} if num_lfs >= 4 else {}
    m = len(coverages)
    if len(accuracies) != m:
        raise ValueError("coverages and accuracies must have one value per LF")
    y = rng.choice(k, size=n, p=pi)
    L = np.full((n, m), ABSTAIN, dtype=np.int8)
    for j in range(m):
        votes = rng.random(n) < coverages[j]
        correct = rng.random(n) < accuracies[j]
        # A wrong vote: uniform over the k-1 other classes.
        wrong = (y + rng.integers(1, k, size=n)) % k
        L[:, j] = np.where(votes, np.where(correct, y, wrong), ABSTAIN)
    for dst, src in copies.items():
        take = rng.random(n) < copy_rate
        L[take, dst] = L[take, src]
    voted = L != ABSTAIN
    cov = voted.mean(axis=0)
    acc = np.array([(L[voted[:, j], j] == y[voted[:, j]]).mean() if voted[:, j].any() else np.nan
                    for j in range(m)])
    return SyntheticVotes(L=L, y=y, class_balance=pi, accuracies=acc, coverages=cov, copies=dict(copies))


# -- several LF structures (the label model must not be tuned to one generator) -----------------
STRUCTURES = ("independent_copies", "one_class_keywords", "correlated_groups", "class_dependent", "high_abstain",
              "mixed")


def _confused(y: np.ndarray, K: int, rng: np.random.Generator, confusion: np.ndarray | None) -> np.ndarray:
    """A wrong class per item: uniform over the others, or drawn from rows of ``confusion`` (K, K)."""
    if confusion is None:
        return (y + rng.integers(1, K, size=len(y))) % K
    u = rng.random(len(y))[:, None]
    return np.argmax(u < np.cumsum(confusion[y], axis=1), axis=1)


def _finish(L: np.ndarray, y: np.ndarray, pi: np.ndarray, copies: dict[int, int] | None = None) -> SyntheticVotes:
    voted = L != ABSTAIN
    acc = np.array([(L[voted[:, j], j] == y[voted[:, j]]).mean() if voted[:, j].any() else np.nan
                    for j in range(L.shape[1])])
    return SyntheticVotes(L=L, y=y, class_balance=pi, accuracies=acc, coverages=voted.mean(axis=0),
                          copies=dict(copies or {}))


def one_class_keywords(n: int, seed: int, K: int = 6) -> SyntheticVotes:
    """Two keyword LFs per class that only ever vote their class (recall 0.2-0.6 of it, precision
    0.6-0.95: their accuracy is their precision) plus one dense LF at 0.45 accuracy; imbalanced classes."""
    rng = np.random.default_rng(seed)
    pi = rng.dirichlet(np.full(K, 3.0))
    y = rng.choice(K, size=n, p=pi)
    cols = []
    for c in range(K):
        for _ in range(2):
            recall, precision = rng.uniform(0.2, 0.6), rng.uniform(0.6, 0.95)
            # false fires on other classes at the rate that gives this precision
            false_rate = recall * pi[c] * (1 - precision) / precision / max(1 - pi[c], 1e-9)
            fire = rng.random(n) < np.where(y == c, recall, false_rate)
            cols.append(np.where(fire, c, ABSTAIN))
    dense = np.where(rng.random(n) < 0.45, y, _confused(y, K, rng, None))
    cols.append(np.where(rng.random(n) < 0.9, dense, ABSTAIN))
    return _finish(np.stack(cols, axis=1).astype(np.int8), y, pi)


def correlated_groups(n: int, seed: int, K: int = 4, groups: tuple[int, ...] = (4, 3, 1, 1, 1)) -> SyntheticVotes:
    """Groups of LFs that share their errors: each group has one latent vote (accurate 0.55-0.75,
    else a wrong class shared by the group); members repeat it with probability 0.85, else vote on
    their own (accuracy 0.6-0.8). Singletons are independent LFs. Coverage 0.3-0.8, shared in a group."""
    rng = np.random.default_rng(seed)
    pi = np.array([0.4, 0.3, 0.2, 0.1])[:K] / np.array([0.4, 0.3, 0.2, 0.1])[:K].sum()
    y = rng.choice(K, size=n, p=pi)
    cols = []
    for size in groups:
        shared = np.where(rng.random(n) < rng.uniform(0.55, 0.75), y, _confused(y, K, rng, None))
        g_cover = rng.random(n) < rng.uniform(0.3, 0.8)
        for _ in range(size):
            own = np.where(rng.random(n) < rng.uniform(0.6, 0.8), y, _confused(y, K, rng, None))
            vote = np.where(rng.random(n) < (0.85 if size > 1 else 0.0), shared, own)
            cover = g_cover if size > 1 else rng.random(n) < rng.uniform(0.3, 0.8)
            cols.append(np.where(cover & (rng.random(n) < 0.95), vote, ABSTAIN))
    return _finish(np.stack(cols, axis=1).astype(np.int8), y, pi)


def _class_dependent_lf(y: np.ndarray, K: int, rng: np.random.Generator, acc_range: tuple[float, float],
                        cover_range: tuple[float, float]) -> np.ndarray:
    """One LF's (n,) votes: per-class accuracy ~ U(acc_range), wrong votes mostly to one class per
    true class (a sparse Dirichlet confusion row), coverage ~ U(cover_range)."""
    acc = rng.uniform(*acc_range, size=K)
    conf = rng.dirichlet(np.full(K, 0.3), size=K)
    np.fill_diagonal(conf, 0.0)
    conf /= conf.sum(axis=1, keepdims=True)
    vote = np.where(rng.random(len(y)) < acc[y], y, _confused(y, K, rng, conf))
    return np.where(rng.random(len(y)) < rng.uniform(*cover_range), vote, ABSTAIN)


def class_dependent(n: int, seed: int, K: int = 5, m: int = 8) -> SyntheticVotes:
    """Accuracy that depends on the true class (0.3-0.95 per LF and class) and systematic
    confusions (each LF's wrong votes go mostly to one class per true class); coverage 0.3-0.7."""
    rng = np.random.default_rng(seed)
    pi = rng.dirichlet(np.full(K, 4.0))
    y = rng.choice(K, size=n, p=pi)
    cols = []
    for _ in range(m):
        cols.append(_class_dependent_lf(y, K, rng, (0.3, 0.95), (0.3, 0.7)))
    return _finish(np.stack(cols, axis=1).astype(np.int8), y, pi)


def high_abstain(n: int, seed: int, K: int = 4, m: int = 20) -> SyntheticVotes:
    """Many sparse LFs: coverage 0.02-0.15 each, accuracy 0.5-0.85, so most items get 0-2 votes."""
    rng = np.random.default_rng(seed)
    return make_votes(n=n, class_balance=(0.4, 0.3, 0.2, 0.1)[:K], coverages=tuple(rng.uniform(0.02, 0.15, m)),
                      accuracies=tuple(rng.uniform(0.5, 0.85, m)), copies={}, seed=seed + 1000)


def mixed(n: int, seed: int, K: int = 5) -> SyntheticVotes:
    """All of it at once: one-class keyword LFs, a group of four sharing errors, class-dependent dense
    LFs, and every LF abstaining often (coverage 0.05-0.4)."""
    rng = np.random.default_rng(seed)
    pi = rng.dirichlet(np.full(K, 3.0))
    y = rng.choice(K, size=n, p=pi)
    cols = []
    for c in range(K):  # keywords
        recall, precision = rng.uniform(0.1, 0.4), rng.uniform(0.55, 0.9)
        false_rate = recall * pi[c] * (1 - precision) / precision / max(1 - pi[c], 1e-9)
        cols.append(np.where(rng.random(n) < np.where(y == c, recall, false_rate), c, ABSTAIN))
    shared = np.where(rng.random(n) < 0.5, y, _confused(y, K, rng, None))  # a group of 4 sharing errors
    g_cover = rng.random(n) < 0.4
    for _ in range(4):
        own = np.where(rng.random(n) < 0.6, y, _confused(y, K, rng, None))
        cols.append(np.where(g_cover & (rng.random(n) < 0.9), np.where(rng.random(n) < 0.8, shared, own), ABSTAIN))
    for _ in range(3):  # class-dependent accuracy, systematic confusions
        cols.append(_class_dependent_lf(y, K, rng, (0.3, 0.9), (0.05, 0.4)))
    return _finish(np.stack(cols, axis=1).astype(np.int8), y, pi)


def structured_votes(structure: str, n: int = 20_000, seed: int = 0) -> SyntheticVotes:
    """Votes from one of ``STRUCTURES`` (each seed draws new LFs)."""
    if structure == "independent_copies":
        return make_votes(n=n, seed=seed)
    makers = {"one_class_keywords": one_class_keywords, "correlated_groups": correlated_groups,
              "class_dependent": class_dependent, "high_abstain": high_abstain, "mixed": mixed}
    if structure not in makers:
        raise ValueError(f"unknown structure {structure!r}; choose one of {STRUCTURES}")
    return makers[structure](n, seed)
