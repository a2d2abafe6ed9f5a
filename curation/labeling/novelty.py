"""Open-set rejection: a novelty score per sample, calibrated on labelled examples.

Scores (higher = more novel, "none of the classes"):

- ``knn``: mean cosine distance to the ``k`` nearest labelled (optionally
  also pseudo-labelled) neighbours; with "none of these" examples, minus the
  distance to the nearest of those;
- ``energy``: ``-T * logsumexp(logits / T)`` of the classifier;
- ``maxprob``: ``1 - max_y P(y | x)``.

Calibration turns a score into an *in-set score* in (0, 1]: the conformal
p-value ``(1 + #{calibration items at least as novel}) / (n + 1)`` against
in-class dev items (or the seeds, scored leave-one-out, without a dev set).
Rejecting below ``a`` then drops about a fraction ``a`` of real samples,
whatever the score's scale. When the dev set holds "none of these" examples,
``auto_threshold`` picks the ``a`` that best separates them from the
in-class ones while keeping a set share of the latter.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

SCORES = ("knn", "energy", "maxprob")


def knn_novelty(Q: np.ndarray, R: np.ndarray, k: int, self_index: np.ndarray | None = None,
                chunk: int = 4096) -> np.ndarray:
    """(n,) mean cosine distance of queries ``Q`` (n, D) to their ``k`` nearest rows of ``R`` (r, D).

    Rows are L2-normalised here. ``self_index`` (n,): the row of ``R`` that is
    the query itself (-1 when none); it is never its own neighbour.
    """
    import faiss

    Qn = np.ascontiguousarray(Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), 1e-12), dtype=np.float32)
    Rn = np.ascontiguousarray(R / np.maximum(np.linalg.norm(R, axis=1, keepdims=True), 1e-12), dtype=np.float32)
    index = faiss.IndexFlatIP(Rn.shape[1])
    index.add(Rn)
    kk = min(k + (self_index is not None), len(Rn))
    out = np.empty(len(Qn))
    for s in range(0, len(Qn), chunk):
        sims, ids = index.search(Qn[s:s + chunk], kk)
        if self_index is not None:
            own = ids == self_index[s:s + chunk, None]
            sims = np.where(own, -np.inf, sims)
            sims = -np.sort(-sims, axis=1)[:, :min(k, max(kk - 1, 1))]  # drop the self hit (or the k+1-th)
        else:
            sims = sims[:, :k]
        out[s:s + chunk] = 1.0 - np.where(np.isfinite(sims), sims, 0.0).mean(axis=1)
    return out


def energy_novelty(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(n,) free energy ``-T logsumexp(logits / T)``: high where no class fits."""
    return -temperature * logsumexp(np.asarray(logits) / temperature, axis=1)


def maxprob_novelty(probs: np.ndarray) -> np.ndarray:
    """(n,) ``1 - max probability``."""
    return 1.0 - np.asarray(probs).max(axis=1)


@dataclass
class Calibration:
    """Novelty scores of in-class calibration items; ``in_set`` maps scores to conformal p-values."""

    scores: np.ndarray  # sorted ascending

    @classmethod
    def from_scores(cls, scores: np.ndarray) -> "Calibration":
        s = np.sort(np.asarray(scores, dtype=np.float64))
        if len(s) == 0:
            raise ValueError("novelty calibration needs at least one in-class item")
        return cls(s)

    def in_set(self, novelty: np.ndarray) -> np.ndarray:
        """(n,) in-set scores: share of calibration items at least as novel (conformal p-value)."""
        n = len(self.scores)
        at_least = n - np.searchsorted(self.scores, np.asarray(novelty, dtype=np.float64), side="left")
        return (1.0 + at_least) / (n + 1.0)


def auto_threshold(in_set_known: np.ndarray, in_set_none: np.ndarray, keep_known: float = 0.95
                   ) -> tuple[float, float]:
    """(abstain_below, balanced accuracy) separating in-class from "none" items.

    Candidates are the observed in-set scores (just above each "none" one);
    among those that keep at least ``keep_known`` of the in-class items
    (score >= a), the one rejecting "none" items (score < a) best, by the
    mean of both rates, wins; ties go to the smaller threshold.
    """
    known, none = np.asarray(in_set_known), np.asarray(in_set_none)
    cands = np.unique(np.concatenate([[0.0], known, none + 1e-12]))
    best = (0.0, 0.5 * ((known >= 0).mean() + 0.0))
    for a in cands:
        kept = (known >= a).mean()
        if kept < keep_known:
            break  # larger thresholds keep even fewer
        bal = 0.5 * (kept + (none < a).mean())
        if bal > best[1] + 1e-12:
            best = (float(a), float(bal))
    return best
