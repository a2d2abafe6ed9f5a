"""Referee LFs: whether the label model's LF links help, judged without labels.

An LF whose errors are independent of the other LFs' agrees more often with
the more accurate of two models that do not see its vote (a right model
agrees with probability a_j, a wrong one at most 1 - a_j). So each referee
is left out of both models' posteriors and the items where exactly one of
them agrees with it are counted (McNemar). Referees must be LFs the label
model left *unlinked*: an LF that shares errors with others sides with
whichever model counts those shared errors most.

The label model uses it for links vs no links (both fits share the
parameters' small in-sample bias): on 38 draws of the synthetic structures
with links found (1,000-20,000 items) it dropped them on the three where
they cost 3.4-5.1 points and never lost more than 0.07 points. As the
label-model-vs-majority-vote test of ``--model auto`` it was measured and
not used: in-sample it picked the label model where it was 5-20 points worse
on 300-1,000 items, and cross-fitted (10 folds) it still did on 4 of 96
draws, once by 4.6 points at 20,000 items; the leave-one-LF-out refit test
there errs only toward majority vote.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from .lf import ABSTAIN

Predict = Callable[[int], np.ndarray]  # LF index left out -> (n,) predictions without its vote


def unlinked(parents: Sequence[int]) -> list[int]:
    """LFs with neither a parent nor a child in the dependency forest ``parents`` (m,)."""
    has_child = {p for p in parents if p >= 0}
    return [j for j, p in enumerate(parents) if p < 0 and j not in has_child]


def referee_counts(L: np.ndarray, w: np.ndarray, pred_a: Predict, pred_b: Predict,
                   referees: Sequence[int]) -> tuple[float, float, int]:
    """(weight where only A agrees, weight where only B agrees, referees used).

    ``L``: (n, m) votes with row weights ``w`` (n,); an item counts for
    referee j when j voted and at least one other LF did (else both models
    see nothing).
    """
    voted = L != ABSTAIN
    n_voted = voted.sum(axis=1)
    a_only = b_only = 0.0
    used = 0
    for j in referees:
        rows = voted[:, j] & (n_voted > 1)
        if not rows.any():
            continue
        target = L[rows, j]
        ga, gb = pred_a(j)[rows] == target, pred_b(j)[rows] == target
        a_only += float(w[rows] @ (ga & ~gb))
        b_only += float(w[rows] @ (gb & ~ga))
        used += 1
    return a_only, b_only, used


def mcnemar_z(a_only: float, b_only: float) -> float:
    """z of McNemar's test (A better when positive); 0 when no item separates them."""
    return (a_only - b_only) / math.sqrt(a_only + b_only) if a_only + b_only else 0.0


def argmax_without(ll: np.ndarray, codes: np.ndarray, tables: Sequence[np.ndarray], j: int) -> np.ndarray:
    """(n,) most probable class from a label model's log-likelihoods ``ll`` (K, n) with LF j's term
    ``tables[j]`` (C_j, K) at ``codes[j]`` (n,) removed; valid for an unlinked LF only."""
    return (ll - np.ascontiguousarray(tables[j].T)[:, codes[j]]).argmax(axis=0)
