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
