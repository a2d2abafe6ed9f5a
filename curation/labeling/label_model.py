"""The label model: learns LF accuracies without labels and combines the votes.

``LabelModel`` is a Dawid-Skene latent-class model fitted by EM, extended
with a learned dependency forest between LFs:

- every LF j has a full class-conditional output distribution
  ``P(L_j = v | Y = y)`` over the K classes *and* abstain (so class-dependent
  coverage and systematic confusions are learned, not just one accuracy);
- LFs found to depend on each other beyond what the latent class explains
  (an LF copying another, two near-identical keyword rules, kNN votes from
  the same embeddings) are linked in a forest, and a linked LF is modelled
  conditionally on its parent: ``P(L_j = v | L_parent = u, Y = y)``. Copies
  therefore add only the evidence they really carry instead of being counted
  twice, which is what makes majority vote and independent models over-trust
  them. Links are found by comparing each pair's observed joint vote table
  with the one the fitted model implies (a G-test with a BIC threshold and a
  minimum effect size), then the model is refitted; a few rounds at most;
- the class balance is estimated (or fixed when given);
- a Dirichlet prior centred on each LF's confusion table against majority
  vote, and on majority vote's class balance (``prior_strength``), keeps EM
  from explaining agreement among weak, correlated LFs with latent groups
  that are not the classes, or from draining the classes into one;
- the smoothing pseudo-counts of a table are shaped like the LF's observed
  output distribution, not spread uniformly over the cells: add-one per cell
  charges every class for the codes a one-class LF never emits, much more
  in relative terms for a class with little mass, which made EM put 0.97 of
  the balance on one class with 10 one-class keyword LFs on 320 items;
- everything is deterministic: initialisation from majority vote, no random
  restarts, ties broken by the class prior then the lowest class index;
- probabilities are the model's posteriors (calibrated when the model
  fits); with a labelled dev set ``calibrate`` fits a temperature on top.

Rows of the label matrix that repeat are fitted once with a weight, so a
million items with few distinct vote patterns cost little; the E and M
steps are gathers and ``bincount`` over contiguous rows of (LFs, n) codes
and (K, n) posteriors, so 1M items x 20 LFs fit in about 10 CPU seconds
(see bench/labeling_scale.py).

``MajorityVote`` is the baseline with the same interface.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

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


def _compress(L: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _worth_compressing(L: np.ndarray, sample: int = 20_000) -> bool:
    """True when rows repeat enough for fitting unique rows to pay off,
    judged on a deterministic sample (many LFs x many items rarely repeat)."""
    n = L.shape[0]
    if n <= sample:
        return True
    rows = L[np.random.default_rng(0).choice(n, sample, replace=False)]
    return len(np.unique(rows, axis=0)) < 0.5 * sample


def _logsumexp_cols(a: np.ndarray) -> np.ndarray:
    """log-sum-exp over axis 0 of a (K, n) array: (n,)."""
    mx = a.max(axis=0)
    return mx + np.log(np.exp(a - mx[None, :]).sum(axis=0))


def _logsumexp_rows(a: np.ndarray) -> np.ndarray:
    mx = a.max(axis=1, keepdims=True)
    return (mx + np.log(np.exp(a - mx).sum(axis=1, keepdims=True)))[:, 0]


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


@dataclass
class Dependency:
    """A learned link: ``child`` is modelled conditionally on ``parent``."""

    child: int
    parent: int
    kl: float  # per-item KL (nats) of the pair's observed vs modelled joint votes when found
    found_in_round: int


class LabelModel:
    """Dawid-Skene EM with full confusion matrices and a learned LF dependency forest.

    Parameters
    ----------
    cardinality: number of classes K.
    class_balance: (K,) fixed class prior; estimated by EM when None.
    dependencies: learn links between LFs that copy each other (True) or
        assume conditional independence (False, plain Dawid-Skene).
    smoothing: Dirichlet pseudo-counts, K+1 times this per class column of an
        independent table, distributed like the LF's observed output
        distribution / per row of a linked table (toward the LF's independent
        distribution).
    min_dependency: smallest per-item KL (nats) a pair's misfit must reach to
        be linked, on top of the BIC threshold (guards huge-n trivia).
    max_rounds: rounds of (find links, refit).
    prior_strength: weight, in multiples of the number of items, of a
        Dirichlet prior centred on each LF's confusion table measured against
        majority vote (the first M-step). 0 is plain maximum likelihood, which
        recovers the LF accuracies exactly when LFs follow the model; with
        weak, correlated LFs (errors that agree, as kNN LFs on the same
        embeddings do) plain EM can settle on latent groups that are not the
        classes, and the prior keeps it near the majority-vote reading
        (bench/results/labeling.md: CIFAR). Default 1: data and prior weigh
        the same.
    link_sample: rows used to test LF pairs for links (deterministic subsample).
    """

    def __init__(
        self,
        cardinality: int,
        *,
        class_balance: Sequence[float] | None = None,
        dependencies: bool = True,
        smoothing: float = 1.0,
        min_dependency: float = 0.01,
        max_rounds: int = 3,
        max_iter: int = 300,
        tol: float = 1e-7,
        compress: bool = True,
        link_sample: int = 200_000,
        prior_strength: float = 1.0,
    ):
        if cardinality < 2:
            raise ValueError("cardinality must be at least 2")
        self.K = int(cardinality)
        self.fixed_balance = None if class_balance is None else self._check_balance(class_balance)
        self.dependencies_enabled = dependencies
        self.smoothing = float(smoothing)
        self.min_dependency = float(min_dependency)
        self.max_rounds = int(max_rounds)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.compress = compress
        self.link_sample = int(link_sample)
        if prior_strength < 0:
            raise ValueError("prior_strength must be >= 0")
        self.prior_strength = float(prior_strength)
        self._anchor: list[np.ndarray] | None = None
        self._anchor_mass = 0.0
        self._anchor_balance = np.full(self.K, 1.0 / self.K)
        self._base: list[np.ndarray] = []
        self.temperature = 1.0
        self.m = 0
        self.parents: list[int] = []
        self.dependencies: list[Dependency] = []
        self.log_pi = np.full(self.K, -math.log(self.K))
        self.tables: list[np.ndarray] = []  # log P(code | y), (C_j, K)
        self.indep_probs: list[np.ndarray] = []  # P(v | y) of the independent fit, (K+1, K)
        self.n_iter = 0
        self.log_likelihood = float("nan")
        self.lf_names: list[str] = []

    def _check_balance(self, b: Sequence[float]) -> np.ndarray:
        b = np.asarray(b, dtype=np.float64)
        if b.shape != (self.K,) or np.any(b <= 0):
            raise ValueError(f"class_balance needs {self.K} positive values, got {list(b)}")
        return b / b.sum()

    # -- codes ---------------------------------------------------------------
    # Internals use an (m, n) code layout and (K, n) posteriors: every
    # per-LF / per-class operation then runs on one contiguous row, which is
    # several times faster than strided columns of an (n, m) array at 1M items.
    def _codes(self, L: np.ndarray, parents: list[int] | None = None) -> np.ndarray:
        """Per-LF table row of each item: (m, n) int32.

        Votes are shifted to 0..K (0 = abstain); a linked LF's code combines
        its parent's vote u and its own v as u * (K + 1) + v.
        """
        parents = self.parents if parents is None else parents
        Lp = np.ascontiguousarray(L.T, dtype=np.int32) + 1
        codes = Lp.copy()
        for j, p in enumerate(parents):
            if p >= 0:
                codes[j] = Lp[p] * (self.K + 1) + Lp[j]
        return codes

    def _table_size(self, j: int, parents: list[int]) -> int:
        return (self.K + 1) ** (2 if parents[j] >= 0 else 1)

    # -- EM ------------------------------------------------------------------
    def _loglik(self, codes: np.ndarray) -> np.ndarray:
        """(K, n) log P(y) + sum_j log P(L_j | parent, y) for codes (m, n)."""
        n = codes.shape[1]
        ll = np.empty((self.K, n))
        ll[:] = self.log_pi[:, None]
        for j, t in enumerate(self.tables):
            tT = np.ascontiguousarray(t.T)  # (K, C_j)
            c = codes[j]
            for y in range(self.K):
                ll[y] += tT[y].take(c)
        return ll

    def _m_step(self, codes: np.ndarray, qw: np.ndarray) -> None:
        """Tables and class balance from weighted posteriors ``qw`` (K, n)."""
        K1 = self.K + 1
        tables = []
        for j, p in enumerate(self.parents):
            size = self._table_size(j, self.parents)
            c = codes[j]
            counts = np.empty((size, self.K))
            for y in range(self.K):
                counts[:, y] = np.bincount(c, weights=qw[y], minlength=size)
            if p < 0:
                # Pseudo-counts shaped like the LF's own output distribution,
                # not uniform over cells: uniform add-one charges every class
                # for codes the LF never emits, far more in relative terms for
                # a class with little mass, and EM then pours everything into
                # one class (10 one-class keyword LFs on a few hundred items).
                counts += self._base[j][:, None] * (self.smoothing * K1)
                if self._anchor is not None and self.prior_strength > 0:
                    counts += self._anchor[j] * (self.prior_strength * self._anchor_mass / self.K)
                probs = counts / counts.sum(axis=0, keepdims=True)
            else:
                # Shrink each (parent vote, class) row toward the LF's own
                # independent distribution: rare rows fall back to it.
                c3 = counts.reshape(K1, K1, self.K)
                prior = self.indep_probs[j][None, :, :] * (self.smoothing * K1)
                c3 = c3 + prior
                probs = (c3 / c3.sum(axis=1, keepdims=True)).reshape(size, self.K)
            tables.append(np.log(probs))
        self.tables = tables
        if self._anchor is None and self.prior_strength > 0:
            # The first M-step runs on majority-vote soft labels: its tables
            # and class balance are the prior's centre for every later step.
            self._anchor = [np.exp(t) for t in tables]
            self._anchor_mass = float(qw.sum())
            mv = qw.sum(axis=1) + 1.0
            self._anchor_balance = mv / mv.sum()
        if self.fixed_balance is None:
            # Dirichlet prior on the balance, centred on majority vote's class
            # frequencies with the tables' weight (prior_strength x items):
            # EM cannot drain classes into one because that explains the
            # votes a little better (the collapse seen with many one-class LFs).
            pi = qw.sum(axis=1) + 1.0
            if self._anchor is not None and self.prior_strength > 0:
                pi = pi + self._anchor_balance * (self.prior_strength * self._anchor_mass)
            self.log_pi = np.log(pi / pi.sum())
        else:
            self.log_pi = np.log(self.fixed_balance)

    def _em(self, codes: np.ndarray, w: np.ndarray, q: np.ndarray) -> np.ndarray:
        """EM from posteriors ``q`` (K, n) until the log-likelihood stops improving."""
        total = float(w.sum())
        prev = -np.inf
        cur = prev
        for it in range(self.max_iter):
            self._m_step(codes, q * w[None, :])
            ll = self._loglik(codes)
            lse = _logsumexp_cols(ll)
            cur = float(lse @ w)
            ll -= lse[None, :]
            q = np.exp(ll, out=ll)
            self.n_iter += 1
            if cur - prev < self.tol * total:
                break
            prev = cur
        self.log_likelihood = cur
        return q

    def _marginals(self, codes: np.ndarray, w: np.ndarray) -> list[np.ndarray]:
        """Each LF's observed output distribution (K+1,), add-one smoothed over
        the items so a code never seen keeps a small, not zero, probability."""
        K1 = self.K + 1
        out = []
        for j in range(codes.shape[0]):
            c = np.bincount(codes[j], weights=w, minlength=K1) + 1.0
            out.append(c / c.sum())
        return out

    def _mv_init(self, L: np.ndarray) -> np.ndarray:
        """Majority-vote soft labels (K, n): vote shares (ties split); no votes: uniform."""
        n = L.shape[0]
        counts = np.zeros((self.K, n))
        for y in range(self.K):
            counts[y] = (L == y).sum(axis=1)
        tot = counts.sum(axis=0, keepdims=True)
        top = counts.max(axis=0, keepdims=True)
        q = ((counts == top) & (tot > 0)).astype(np.float64) + 0.01 * counts  # keep runner-up information
        q[:, tot[0] == 0] = 1.0
        return q / q.sum(axis=0, keepdims=True)

    def fit(self, L: np.ndarray, lf_names: Sequence[str] | None = None) -> "LabelModel":
        """Learn class balance, LF output tables and LF links from votes alone.

        ``L``: (n, m) ints in {-1 (abstain), 0..K-1}.
        """
        L = check_label_matrix(L, self.K, lf_names)
        self.lf_names = list(lf_names) if lf_names is not None else [f"lf_{j}" for j in range(L.shape[1])]
        n, self.m = L.shape
        if self.compress and _worth_compressing(L):
            U, w, _ = _compress(L)
        else:
            U, w = L, np.ones(n)
        self.parents = [-1] * self.m
        self.dependencies = []
        self.n_iter = 0
        self.temperature = 1.0
        self.indep_probs = []
        self._anchor, self._anchor_mass = None, 0.0
        codes = self._codes(U)
        self._base = self._marginals(codes, w)
        q = self._em(codes, w, self._mv_init(U))
        self.indep_probs = [np.exp(t) for t in self.tables]
        if self.dependencies_enabled and self.m > 1:
            for rnd in range(1, self.max_rounds + 1):
                new = self._find_links(U, w, rnd)
                if not new:
                    break
                info = {frozenset((d.child, d.parent)): d for d in self.dependencies + new}
                self.parents = _orient_forest(self.m, [(d.child, d.parent) for d in info.values()],
                                              root_score=(U != ABSTAIN).astype(np.float64).T @ w)
                # Record each link in the direction the forest uses.
                self.dependencies = []
                for j, p in enumerate(self.parents):
                    if p >= 0:
                        d = info[frozenset((j, p))]
                        self.dependencies.append(Dependency(j, p, d.kl, d.found_in_round))
                codes = self._codes(U)
                q = self._em(codes, w, q)
        return self

    # -- links between LFs ---------------------------------------------------
    def lf_output_probs(self) -> np.ndarray:
        """Marginal ``P(L_j = v | Y = y)`` for every LF: (m, K+1, K), v = 0 is abstain."""
        K1 = self.K + 1
        out = np.zeros((self.m, K1, self.K))
        done = [False] * self.m
        order = _topological(self.parents)
        for j in order:
            p = self.parents[j]
            t = np.exp(self.tables[j])
            if p < 0:
                out[j] = t
            else:
                assert done[p]
                t3 = t.reshape(K1, K1, self.K)  # (u, v, y)
                out[j] = np.einsum("uy,uvy->vy", out[p], t3)
            done[j] = True
        return out

    def _find_links(self, U: np.ndarray, w: np.ndarray, rnd: int) -> list[Dependency]:
        """Pairs whose joint votes the current model explains badly (G-test).

        For each pair (a, b) not yet in one tree: observed joint table
        O[u, v] of their votes vs the model's E[u, v] = N sum_y pi_y
        P(L_a=u|y) P(L_b=v|y). A pair is linked when N * KL(O||E) beats the
        BIC cost of the extra parameters and KL exceeds ``min_dependency``;
        candidates are added strongest first, keeping a forest.
        """
        K1 = self.K + 1
        if U.shape[0] > self.link_sample:
            # The pair tables are estimated well from a deterministic subsample;
            # the weights keep it representative of the (compressed) matrix.
            pick = np.random.default_rng(0).choice(U.shape[0], self.link_sample, replace=False, p=w / w.sum())
            U, w = U[np.sort(pick)], np.ones(self.link_sample)
        N = float(w.sum())
        P = self.lf_output_probs()
        pi = np.exp(self.log_pi)
        comp = _components(self.m, [(d.child, d.parent) for d in self.dependencies])
        Lp = np.ascontiguousarray(U.T, dtype=np.int64) + 1
        unweighted = bool(np.all(w == 1.0))
        extra_params = self.K * K1 * self.K - self.K * self.K  # (u, y) rows of K free values vs y rows
        bic = 0.5 * extra_params * math.log(max(N, 2.0))
        cands: list[tuple[float, int, int]] = []
        for a in range(self.m):
            base = Lp[a] * K1
            for b in range(a + 1, self.m):
                if comp[a] == comp[b]:
                    continue
                code = base + Lp[b]
                O = (np.bincount(code, minlength=K1 * K1) if unweighted else
                     np.bincount(code, weights=w, minlength=K1 * K1)) / N
                E = np.einsum("y,uy,vy->uv", pi, P[a], P[b]).reshape(-1)
                nz = O > 0
                kl = float(np.sum(O[nz] * np.log(O[nz] / np.maximum(E[nz], 1e-300))))
                if kl > self.min_dependency and N * kl > bic:
                    cands.append((kl, a, b))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        links = []
        for kl, a, b in cands:
            if comp[a] == comp[b]:
                continue
            old, new = comp[b], comp[a]
            comp = [new if c == old else c for c in comp]
            links.append(Dependency(child=b, parent=a, kl=kl, found_in_round=rnd))
        return links

    # -- prediction ----------------------------------------------------------
    def _check_fitted(self) -> None:
        if not self.tables:
            raise RuntimeError("LabelModel is not fitted; call fit(L) first")

    def predict_log_proba(self, L: np.ndarray) -> np.ndarray:
        """(n, K) log posteriors of the classes given the votes."""
        self._check_fitted()
        L = check_label_matrix(L, self.K, self.lf_names) if L.shape[0] and np.any(L != ABSTAIN) else \
            np.asarray(L, dtype=np.int16)
        if L.shape[1] != self.m:
            raise LabelModelError(f"label matrix has {L.shape[1]} LF columns, the model was fitted on {self.m}")
        U, _, inv = _compress(L) if self.compress and L.shape[0] and _worth_compressing(L) else \
            (L, None, np.arange(L.shape[0]))
        ll = self._loglik(self._codes(U)).T / self.temperature  # (u, K)
        ll -= _logsumexp_rows(ll)[:, None] if ll.shape[0] else 0.0
        return ll[inv]

    def predict_proba(self, L: np.ndarray) -> np.ndarray:
        """(n, K) class probabilities given the votes."""
        return np.exp(self.predict_log_proba(L))

    def predict(self, L: np.ndarray, abstain_if_no_votes: bool = True) -> np.ndarray:
        """(n,) most probable class; ties go to the larger class prior, then the
        lower index; rows where every LF abstained get -1 unless told otherwise."""
        P = self.predict_proba(L)
        pred = argmax_ties(P, np.exp(self.log_pi), tol=1e-9)
        if abstain_if_no_votes:
            pred[~np.any(np.asarray(L) != ABSTAIN, axis=1)] = ABSTAIN
        return pred

    @property
    def class_balance(self) -> np.ndarray:
        return np.exp(self.log_pi)

    def lf_accuracies(self) -> np.ndarray:
        """(m,) learned P(vote correct | LF votes), from the fitted tables."""
        P = self.lf_output_probs()
        pi = self.class_balance
        correct = np.array([sum(pi[y] * P[j, y + 1, y] for y in range(self.K)) for j in range(self.m)])
        voted = np.array([sum(pi[y] * (1 - P[j, 0, y]) for y in range(self.K)) for j in range(self.m)])
        return correct / np.maximum(voted, 1e-12)

    def lf_coverages(self) -> np.ndarray:
        """(m,) learned P(LF votes)."""
        P = self.lf_output_probs()
        return 1.0 - P[:, 0, :] @ self.class_balance

    # -- calibration with labels ----------------------------------------------
    def calibrate(self, L_dev: np.ndarray, y_dev: np.ndarray, prior_scale: float = 0.5) -> float:
        """Fit a temperature T on a labelled dev set (items with at least one vote).

        Minimises the dev negative log-likelihood plus a log-normal prior on
        T (``log T ~ N(0, prior_scale^2)`` per dev set), so a small dev set
        that happens to be all correct cannot push T toward 0 (overconfidence);
        with many dev items the data decide. Returns T (1.0 when fewer than
        2 usable dev items).
        """
        self._check_fitted()
        y_dev = np.asarray(y_dev)
        keep = np.any(np.asarray(L_dev) != ABSTAIN, axis=1) & (y_dev >= 0)
        self.temperature = 1.0
        if keep.sum() < 2:
            return self.temperature
        U = np.asarray(L_dev)[keep]
        ll = self._loglik(self._codes(U.astype(np.int16))).T  # (n, K)
        y = y_dev[keep].astype(np.int64)
        n = len(y)

        def objective(log_t: float) -> float:
            z = ll / math.exp(log_t)
            nll = float((_logsumexp_rows(z) - z[np.arange(n), y]).mean())
            return nll + log_t ** 2 / (2 * prior_scale ** 2 * n)

        a, b = math.log(0.05), math.log(20.0)  # golden-section search over log T
        g = (math.sqrt(5) - 1) / 2
        c, d = b - g * (b - a), a + g * (b - a)
        for _ in range(60):
            if objective(c) < objective(d):
                b = d
            else:
                a = c
            c, d = b - g * (b - a), a + g * (b - a)
        self.temperature = float(math.exp((a + b) / 2))
        return self.temperature

    # -- persistence -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable parameters (what ``from_dict`` restores)."""
        return {
            "type": "labelmodel", "cardinality": self.K, "lf_names": self.lf_names,
            "parents": self.parents, "class_balance": self.class_balance.tolist(),
            "fixed_balance": None if self.fixed_balance is None else self.fixed_balance.tolist(),
            "tables": [np.exp(t).tolist() for t in self.tables],
            "temperature": self.temperature, "n_iter": self.n_iter, "prior_strength": self.prior_strength,
            "log_likelihood": self.log_likelihood,
            "dependencies": [d.__dict__ for d in self.dependencies],
            "lf_accuracies": self.lf_accuracies().tolist() if self.tables else [],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LabelModel":
        m = cls(d["cardinality"], class_balance=d.get("fixed_balance"))
        m.lf_names = list(d["lf_names"])
        m.m = len(m.lf_names)
        m.parents = [int(p) for p in d["parents"]]
        m.log_pi = np.log(np.asarray(d["class_balance"]))
        m.tables = [np.log(np.asarray(t)) for t in d["tables"]]
        m.temperature = float(d.get("temperature", 1.0))
        m.dependencies = [Dependency(**x) for x in d.get("dependencies", [])]
        return m

    def save(self, path: str) -> None:
        from webcurate.shards import storage

        storage.write_bytes(path, json.dumps(self.to_dict(), indent=1).encode())


class MajorityVote:
    """Majority vote with deterministic ties (the baseline).

    Probabilities are vote shares (tied classes share equally); rows with no
    vote get the class prior. ``tie_break``: "prior" (the class seen more often
    as a majority, then the lower index), "index", or "random" (seeded).
    """

    def __init__(self, cardinality: int, *, class_balance: Sequence[float] | None = None,
                 tie_break: str = "prior", seed: int = 0):
        if tie_break not in ("prior", "index", "random"):
            raise ValueError("tie_break must be prior, index or random")
        self.K = int(cardinality)
        self.tie_break = tie_break
        self.seed = seed
        self.prior = None if class_balance is None else np.asarray(class_balance, float) / np.sum(class_balance)
        self.lf_names: list[str] = []

    def _counts(self, L: np.ndarray) -> np.ndarray:
        counts = np.zeros((L.shape[0], self.K))
        for y in range(self.K):
            counts[:, y] = (L == y).sum(axis=1)
        return counts

    def fit(self, L: np.ndarray, lf_names: Sequence[str] | None = None) -> "MajorityVote":
        L = check_label_matrix(L, self.K, lf_names)
        self.lf_names = list(lf_names) if lf_names is not None else [f"lf_{j}" for j in range(L.shape[1])]
        if self.prior is None:
            c = self._counts(L)
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
        c = self._counts(np.asarray(L))
        tot = c.sum(axis=1, keepdims=True)
        P = c / np.maximum(tot, 1)
        P[tot[:, 0] == 0] = self.class_balance
        return P

    def predict(self, L: np.ndarray, abstain_if_no_votes: bool = True) -> np.ndarray:
        L = np.asarray(L)
        c = self._counts(L)
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
        return {"type": "majority", "cardinality": self.K, "lf_names": self.lf_names,
                "class_balance": self.class_balance.tolist(), "tie_break": self.tie_break}


# -- forest helpers ------------------------------------------------------------
def _components(m: int, edges: list[tuple[int, int]]) -> list[int]:
    comp = list(range(m))

    def find(x: int) -> int:
        while comp[x] != x:
            comp[x] = comp[comp[x]]
            x = comp[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            comp[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(m)]


def _orient_forest(m: int, edges: list[tuple[int, int]], root_score: np.ndarray) -> list[int]:
    """Parent of each node in a forest given undirected edges; each tree is
    rooted at its node with the largest ``root_score`` (coverage), ties to
    the lower index, so the widest-covering LF carries the shared evidence."""
    adj: dict[int, list[int]] = {i: [] for i in range(m)}
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    parents = [-1] * m
    seen = [False] * m
    comp = _components(m, edges)
    for c in sorted(set(comp)):
        nodes = [i for i in range(m) if comp[i] == c]
        root = min(nodes, key=lambda i: (-root_score[i], i))
        stack = [root]
        seen[root] = True
        while stack:
            x = stack.pop()
            for y in sorted(adj[x]):
                if not seen[y]:
                    seen[y] = True
                    parents[y] = x
                    stack.append(y)
    return parents


def _topological(parents: list[int]) -> list[int]:
    """Nodes ordered so every parent comes before its children."""
    order: list[int] = []
    placed = [False] * len(parents)
    while len(order) < len(parents):
        progressed = False
        for j, p in enumerate(parents):
            if not placed[j] and (p < 0 or placed[p]):
                placed[j] = True
                order.append(j)
                progressed = True
        if not progressed:  # pragma: no cover - forests have no cycles
            raise RuntimeError("LF dependency structure has a cycle")
    return order
