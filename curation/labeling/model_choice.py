"""``--model auto``: the label model only where the evidence shows it beats majority vote.

No label model wins on every LF structure (WRENCH; our own generators in
bench/labeling_synthetic.py find structures where it loses to majority
vote). So ``auto`` keeps the label model only when it is shown better:

- with a labelled dev set: the model more accurate on the dev items that
  have votes (ties go to majority vote);
- without one, by held-out LF agreement: each LF in turn is left out, both
  models are fitted on the others, and we count the items where exactly one
  of them agrees with the left-out LF's vote. An LF whose errors are
  independent of the others agrees more often with the more accurate model,
  so the label model is chosen when it wins those items by a clear margin
  (McNemar ``z > 2``). LFs that share errors with the rest make the left-out
  LF side with majority vote (it counts their shared error many times), so
  the test leans to majority vote: the safe side.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .label_matrix import check_label_matrix
from .label_model import LabelModel
from .lf import ABSTAIN
from .majority import MajorityVote

MIN_Z = 2.0
SAMPLE = 50_000


def held_out_agreement(L: np.ndarray, K: int, class_balance: Sequence[float] | None = None,
                       sample: int = SAMPLE) -> dict[str, Any]:
    """McNemar z of label model vs majority vote on agreement with each left-out LF, (n, m) votes ``L``.

    Returns {"z", "label_model_only", "majority_only", "lfs_used"}; rows are
    subsampled deterministically to ``sample`` (the test needs counts, not all rows).
    """
    L = np.asarray(L)
    if L.shape[0] > sample:
        L = L[np.sort(np.random.default_rng(0).choice(L.shape[0], sample, replace=False))]
    a = b = used = 0
    for j in range(L.shape[1]):
        rest = np.delete(L, j, axis=1)
        target = L[:, j]
        rows = (target != ABSTAIN) & np.any(rest != ABSTAIN, axis=1)
        if rows.sum() < 20:
            continue
        lm = LabelModel(K, class_balance=class_balance).fit(rest).predict(rest[rows])
        mv = MajorityVote(K, class_balance=class_balance).fit(rest).predict(rest[rows])
        g1, g2 = lm == target[rows], mv == target[rows]
        a += int((g1 & ~g2).sum())
        b += int((g2 & ~g1).sum())
        used += 1
    z = (a - b) / math.sqrt(a + b) if a + b else 0.0
    return {"z": round(float(z), 2), "label_model_only": a, "majority_only": b, "lfs_used": used}


def choose_without_dev(L: np.ndarray, K: int, class_balance: Sequence[float] | None = None) -> tuple[str, dict]:
    """("labelmodel" or "majority", the evidence) from held-out LF agreement."""
    L = check_label_matrix(L, K)
    if L.shape[1] < 2:
        return "majority", {"reason": "one LF: nothing to weigh"}
    ev = held_out_agreement(L, K, class_balance)
    return ("labelmodel" if ev["z"] > MIN_Z else "majority"), ev


def choose_with_dev(acc_lm: float | None, acc_mv: float | None) -> str:
    """The label model when it is strictly more accurate on the dev set, else majority vote."""
    return "labelmodel" if (acc_lm or 0.0) > (acc_mv or 0.0) else "majority"
