"""Temperature scaling on a labelled dev set, shared by the label model and self-training.

``fit_temperature`` minimises the dev negative log-likelihood of
``softmax(logits / T)`` plus a log-normal prior on T (``log T ~ N(0,
prior_scale^2)`` for the whole dev set), so a small dev set that happens to
be all correct cannot push T toward 0 (overconfidence); with many dev items
the data decide. The search runs over log T in [log 0.05, log 20] with
scipy's bounded scalar minimiser.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

T_MIN, T_MAX = 0.05, 20.0


def dev_nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of classes ``y`` (n,) under ``softmax(logits / T)``, logits (n, K)."""
    z = logits / temperature
    return float((logsumexp(z, axis=1) - z[np.arange(len(y)), y]).mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray, prior_scale: float = 0.5) -> float:
    """Temperature T for (n, K) ``logits`` and true classes ``y`` (n,); 1.0 with fewer than 2 items."""
    y = np.asarray(y, dtype=np.int64)
    n = len(y)
    if n < 2:
        return 1.0
    logits = np.asarray(logits, dtype=np.float64)

    def objective(log_t: float) -> float:
        return dev_nll(logits, y, math.exp(log_t)) + log_t ** 2 / (2 * prior_scale ** 2 * n)

    res = minimize_scalar(objective, bounds=(math.log(T_MIN), math.log(T_MAX)), method="bounded",
                          options={"xatol": 1e-6})
    return float(math.exp(res.x))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(n, K) probabilities of ``softmax(logits / T)``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return np.exp(z - logsumexp(z, axis=1, keepdims=True))
