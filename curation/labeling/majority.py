"""Majority vote: the baseline every label model is measured against, same interface."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .label_matrix import argmax_ties, check_label_matrix, vote_counts
from .lf import ABSTAIN

TIE_BREAKS = ("prior", "index", "random")


class MajorityVote:
    """Majority vote with deterministic ties (the baseline).

    Probabilities are vote shares (tied classes share equally); rows with no
    vote get the class prior. ``tie_break``: "prior" (the class seen more often
    as a majority, then the lower index), "index", or "random" (seeded).
    """

    def __init__(self, cardinality: int, *, class_balance: Sequence[float] | None = None,
                 tie_break: str = "prior", seed: int = 0):
        if tie_break not in TIE_BREAKS:
            raise ValueError("tie_break must be prior, index or random")
        self.K = int(cardinality)
        self.tie_break = tie_break
        self.seed = seed
        self.prior = None if class_balance is None else np.asarray(class_balance, float) / np.sum(class_balance)
        self.lf_names: list[str] = []

    def fit(self, L: np.ndarray, lf_names: Sequence[str] | None = None) -> "MajorityVote":
        """Learn the class prior (vote shares of voted items, add-one) unless it was given."""
        L = check_label_matrix(L, self.K, lf_names)
        self.lf_names = list(lf_names) if lf_names is not None else [f"lf_{j}" for j in range(L.shape[1])]
        if self.prior is None:
            c = vote_counts(L, self.K)
            voted = c.sum(axis=1) > 0
            share = c[voted] / c[voted].sum(axis=1, keepdims=True)
            p = share.sum(axis=0) + 1.0
            self.prior = p / p.sum()
        return self

    @property
    def class_balance(self) -> np.ndarray:
        return self.prior if self.prior is not None else np.full(self.K, 1.0 / self.K)

    def predict_proba(self, L: np.ndarray) -> np.ndarray:
        """(n, K) vote shares; the class prior where nothing voted."""
        c = vote_counts(np.asarray(L), self.K)
        tot = c.sum(axis=1, keepdims=True)
        P = c / np.maximum(tot, 1)
        P[tot[:, 0] == 0] = self.class_balance
        return P

    def predict(self, L: np.ndarray, abstain_if_no_votes: bool = True) -> np.ndarray:
        """(n,) class with the most votes; ties by ``tie_break``; -1 where nothing voted."""
        L = np.asarray(L)
        c = vote_counts(L, self.K)
        if self.tie_break == "random":
            rng = np.random.default_rng(self.seed)
            pred = argmax_ties(c + rng.random(c.shape) * 0.5 * (c == c.max(axis=1, keepdims=True)), None, tol=0)
        elif self.tie_break == "prior":
            pred = argmax_ties(c, self.class_balance, tol=0)
        else:
            pred = argmax_ties(c, None, tol=0)
        if abstain_if_no_votes:
            pred[c.sum(axis=1) == 0] = ABSTAIN
        return pred

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (what the label run saves beside its output)."""
        return {"type": "majority", "cardinality": self.K, "lf_names": self.lf_names,
                "class_balance": self.class_balance.tolist(), "tie_break": self.tie_break}
