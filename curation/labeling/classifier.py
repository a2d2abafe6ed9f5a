"""Classifiers on frozen embeddings for self-training: softmax regression and a small MLP.

Both are fitted full-batch with scipy's L-BFGS from a fixed start (zeros for
the softmax regression, a seeded draw for the MLP), so the same inputs and
seed give the same weights on any machine: self-training rounds stay
deterministic and resumable. Sample weights make the fit class-balanced
(``balanced_weights``) and let pseudo-labels count less than seeds.

Features are prepared once per run by ``FeatureMap``: embeddings are
L2-normalised, centred on the pool mean, normalised again and scaled to unit
variance per dimension, so one L2 strength suits embeddings of any width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp


def _unit(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


@dataclass
class FeatureMap:
    """Embeddings (n, D) -> classifier features (n, D), fitted on the pool."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, E: np.ndarray) -> "FeatureMap":
        U = _unit(np.asarray(E, dtype=np.float64))
        mean = U.mean(axis=0)
        C = _unit(U - mean)
        return cls(mean=mean, scale=np.maximum(C.std(axis=0), 1e-6))

    def centred(self, E: np.ndarray) -> np.ndarray:
        """(n, D) unit vectors after removing the pool's mean direction (the knn novelty space)."""
        return _unit(_unit(np.asarray(E, dtype=np.float64)) - self.mean)

    def __call__(self, E: np.ndarray) -> np.ndarray:
        return self.centred(E) / self.scale


def balanced_weights(y: np.ndarray, K: int, base: np.ndarray | None = None) -> np.ndarray:
    """(n,) weights giving every class present the same total weight (times ``base`` per item).

    The weights sum to the total base weight (n for unit weights), so the L2 strength means the same at any size.
    """
    base = np.ones(len(y)) if base is None else np.asarray(base, dtype=np.float64)
    per_class = np.bincount(y, weights=base, minlength=K)
    present = per_class > 0
    w = base / np.where(present, per_class, 1.0)[y] * (base.sum() / present.sum())
    return w


def _xent(logits: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    """Weighted mean cross-entropy and its gradient w.r.t. the (n, K) logits."""
    lse = logsumexp(logits, axis=1)
    n = len(y)
    loss = float(w @ (lse - logits[np.arange(n), y])) / w.sum()
    G = np.exp(logits - lse[:, None])
    G[np.arange(n), y] -= 1.0
    G *= (w / w.sum())[:, None]
    return loss, G


class SoftmaxRegression:
    """Multinomial logistic regression with an L2 penalty (``l2`` / 2 * ||W||^2; bias free)."""

    def __init__(self, K: int, *, l2: float = 1e-3, max_iter: int = 300, seed: int = 0):
        self.K, self.l2, self.max_iter = int(K), float(l2), int(max_iter)
        self.W: np.ndarray | None = None
        self.b: np.ndarray | None = None

    def fit(self, X: np.ndarray, y: np.ndarray, w: np.ndarray) -> "SoftmaxRegression":
        """Fit on features X (n, D), classes y (n,), weights w (n,)."""
        D, K = X.shape[1], self.K

        def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
            W, b = theta[:D * K].reshape(D, K), theta[D * K:]
            loss, G = _xent(X @ W + b, y, w)
            gW = X.T @ G + self.l2 * W
            return loss + 0.5 * self.l2 * float((W * W).sum()), np.concatenate([gW.ravel(), G.sum(axis=0)])

        res = minimize(f, np.zeros(D * K + K), jac=True, method="L-BFGS-B", options={"maxiter": self.max_iter})
        self.W, self.b = res.x[:D * K].reshape(D, K), res.x[D * K:]
        return self

    def logits(self, X: np.ndarray) -> np.ndarray:
        """(n, K) class scores of features X (n, D)."""
        return X @ self.W + self.b

    def state(self) -> dict[str, np.ndarray]:
        return {"W": self.W, "b": self.b}


class MLP:
    """One hidden ReLU layer of ``hidden`` units, L2 on the weights, seeded He initialisation."""

    def __init__(self, K: int, *, hidden: int = 128, l2: float = 1e-3, max_iter: int = 300, seed: int = 0):
        self.K, self.hidden, self.l2, self.max_iter, self.seed = int(K), int(hidden), float(l2), int(max_iter), seed
        self.params: dict[str, np.ndarray] = {}

    def _unpack(self, theta: np.ndarray, D: int) -> tuple[np.ndarray, ...]:
        H, K = self.hidden, self.K
        i = 0
        W1 = theta[i:i + D * H].reshape(D, H); i += D * H
        b1 = theta[i:i + H]; i += H
        W2 = theta[i:i + H * K].reshape(H, K); i += H * K
        return W1, b1, W2, theta[i:i + K]

    def fit(self, X: np.ndarray, y: np.ndarray, w: np.ndarray) -> "MLP":
        """Fit on features X (n, D), classes y (n,), weights w (n,)."""
        D, H, K = X.shape[1], self.hidden, self.K
        rng = np.random.default_rng(self.seed)
        theta0 = np.concatenate([rng.normal(0, np.sqrt(2.0 / D), D * H), np.zeros(H),
                                 rng.normal(0, np.sqrt(1.0 / H), H * K), np.zeros(K)])

        def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
            W1, b1, W2, b2 = self._unpack(theta, D)
            Z = X @ W1 + b1
            A = np.maximum(Z, 0.0)
            loss, G = _xent(A @ W2 + b2, y, w)
            gA = (G @ W2.T) * (Z > 0)
            grads = [X.T @ gA + self.l2 * W1, gA.sum(axis=0), A.T @ G + self.l2 * W2, G.sum(axis=0)]
            reg = 0.5 * self.l2 * (float((W1 * W1).sum()) + float((W2 * W2).sum()))
            return loss + reg, np.concatenate([g.ravel() for g in grads])

        res = minimize(f, theta0, jac=True, method="L-BFGS-B", options={"maxiter": self.max_iter})
        W1, b1, W2, b2 = self._unpack(res.x, D)
        self.params = {"W1": W1, "b1": b1, "W2": W2, "b2": b2}
        return self

    def logits(self, X: np.ndarray) -> np.ndarray:
        """(n, K) class scores of features X (n, D)."""
        p = self.params
        return np.maximum(X @ p["W1"] + p["b1"], 0.0) @ p["W2"] + p["b2"]

    def state(self) -> dict[str, np.ndarray]:
        return dict(self.params)


CLASSIFIERS = {"logreg": SoftmaxRegression, "mlp": MLP}


def make_classifier(name: str, K: int, **kw: Any) -> SoftmaxRegression | MLP:
    """A fresh classifier by name ("logreg" or "mlp")."""
    if name == "logreg":
        kw.pop("hidden", None)
    return CLASSIFIERS[name](K, **kw)
