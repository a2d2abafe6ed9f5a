"""The label model: learns LF accuracies without labels and combines the votes.

``LabelModel`` is a Dawid-Skene latent-class model fitted by EM, extended
with a learned dependency forest between LFs (``lf_links``):

- every LF j has a full class-conditional output distribution
  ``P(L_j = v | Y = y)`` over the K classes *and* abstain (class-dependent
  coverage and systematic confusions are learned, not just one accuracy);
- LFs that depend on each other beyond what the latent class explains (a
  copy, near-identical keyword rules, kNN votes from one embedding) are
  linked in a forest and a linked LF is modelled given its parent,
  ``P(L_j = v | L_parent = u, Y = y)``, so copies add only the evidence they
  carry. Links come from pair misfits against the fit, then a refit (a few
  rounds); they are kept unless the LFs outside every link, as referees
  (``referees``), side with the fit without links by a clear margin (on one
  mixed draw the links cost 3.5 points);
- a Dirichlet prior centred on majority vote's confusion tables and class
  balance (``prior_strength``) keeps EM on the classes with weak, correlated
  LFs, and is released when the fit without it stays there
  (``release_agreement``);
- deterministic: initialised from majority vote, no random restarts, ties to
  the class prior then the lowest index; probabilities are the posteriors,
  and ``calibrate`` fits a temperature on a labelled dev set.

Repeated rows are fitted once with a weight, and the E and M steps are
gathers and ``bincount`` over contiguous (LFs, n) codes and (K, n)
posteriors: 1M items x 20 LFs fit in about 10 CPU seconds
(bench/labeling_scale.py). ``MajorityVote`` (majority.py) is the baseline
with the same interface.
"""
from __future__ import annotations

import json
import math
from typing import Any, Sequence

import numpy as np
from scipy.special import logsumexp

from .calibration import fit_temperature
from .label_matrix import (LabelModelError, argmax_ties, check_label_matrix, compress_rows, vote_counts,
                           worth_compressing)
from .lf import ABSTAIN
from .lf_links import Dependency, find_links, orient_forest, topological
from .majority import MajorityVote
from .referees import argmax_without, mcnemar_z, referee_counts, unlinked

MIN_LINK_Z = 2.0  # referees must show the links hurt by this McNemar z before they are dropped

__all__ = ["LabelModel", "MajorityVote", "LabelModelError", "Dependency", "argmax_ties", "check_label_matrix"]


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
    release_agreement: after the fit with the prior, EM runs on without it
        from the fitted posteriors; that fit is kept when its predictions
        agree with the prior's on at least this share of the items with
        votes (the prior only blurred tables the data can pin down: in
        bench/labeling_synthetic.py's structures 0.91-0.98 agreement, and
        every release gained 0.1-2.2 points) and dropped otherwise (with
        sparse LFs sharing errors, EM drifts to latent groups that are not
        the classes once the prior is gone: 0.73-0.86 agreement). None keeps
        the prior always.
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
        release_agreement: float | None = 0.9,
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
        if release_agreement is not None and not 0.0 < release_agreement <= 1.0:
            raise ValueError("release_agreement must be in (0, 1] or None")
        self.release_agreement = release_agreement
        self.prior_released = False
        self.prior_agreement: float | None = None
        self.links_z: float | None = None  # referees' McNemar z, links vs none (negative: links hurt)
        self.dropped_links: list[Dependency] = []
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
    def _loglik(self, codes: np.ndarray, tables: list[np.ndarray] | None = None,
                log_pi: np.ndarray | None = None) -> np.ndarray:
        """(K, n) log P(y) + sum_j log P(L_j | parent, y) for codes (m, n) (default: the fitted tables)."""
        tables = self.tables if tables is None else tables
        n = codes.shape[1]
        ll = np.empty((self.K, n))
        ll[:] = (self.log_pi if log_pi is None else log_pi)[:, None]
        for j, t in enumerate(tables):
            tT = np.ascontiguousarray(t.T)  # (K, C_j)
            c = codes[j]
            for y in range(self.K):
                ll[y] += tT[y].take(c)
        return ll

    def _m_step(self, codes: np.ndarray, qw: np.ndarray, prior_weight: float) -> None:
        """Tables and class balance from weighted posteriors ``qw`` (K, n), the prior weighing ``prior_weight``."""
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
                if self._anchor is not None and prior_weight > 0:
                    counts += self._anchor[j] * (prior_weight * self._anchor_mass / self.K)
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
            if self._anchor is not None and prior_weight > 0:
                pi = pi + self._anchor_balance * (prior_weight * self._anchor_mass)
            self.log_pi = np.log(pi / pi.sum())
        else:
            self.log_pi = np.log(self.fixed_balance)

    def _em(self, codes: np.ndarray, w: np.ndarray, q: np.ndarray, prior: bool = True) -> np.ndarray:
        """EM from posteriors ``q`` (K, n) until the log-likelihood stops improving (``prior``: with the prior)."""
        prior_weight = self.prior_strength if prior else 0.0
        total = float(w.sum())
        prev = -np.inf
        cur = prev
        for it in range(self.max_iter):
            self._m_step(codes, q * w[None, :], prior_weight)
            ll = self._loglik(codes)
            lse = logsumexp(ll, axis=0)
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
        counts = vote_counts(L, self.K).T
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
        if self.compress and worth_compressing(L):
            U, w, _ = compress_rows(L)
        else:
            U, w = L, np.ones(n)
        self.parents = [-1] * self.m
        self.dependencies = []
        self.n_iter = 0
        self.temperature = 1.0
        self.indep_probs = []
        self._anchor, self._anchor_mass = None, 0.0
        self.prior_released, self.prior_agreement = False, None
        codes = self._codes(U)
        self._base = self._marginals(codes, w)
        q = self._em(codes, w, self._mv_init(U))
        self.indep_probs = [np.exp(t) for t in self.tables]
        self.links_z, self.dropped_links = None, []
        if self.dependencies_enabled and self.m > 1:
            indep = (codes, self.tables, self.log_pi, self.log_likelihood, q)
            q = self._link_rounds(U, w, q)
            if self.dependencies:
                q = self._test_links(U, w, q, indep)
        if self.release_agreement is not None and self.prior_strength > 0:
            self._release_prior(U, w, q)
        return self

    def _release_prior(self, U: np.ndarray, w: np.ndarray, q: np.ndarray) -> None:
        """EM without the prior from posteriors ``q`` (K, u); kept only if its
        predictions agree with ``q``'s on ``release_agreement`` of the voted items."""
        voted = np.any(U != ABSTAIN, axis=1)  # fit() has already refused a matrix without votes
        saved = (self.tables, self.log_pi, self.log_likelihood)
        q0 = self._em(self._codes(U), w, q, prior=False)
        wv = w[voted]
        same = q0.argmax(axis=0)[voted] == q.argmax(axis=0)[voted]
        self.prior_agreement = round(float(wv @ same / wv.sum()), 4)
        self.prior_released = self.prior_agreement >= self.release_agreement
        if not self.prior_released:
            self.tables, self.log_pi, self.log_likelihood = saved

    def _link_rounds(self, U: np.ndarray, w: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Rounds of (find LF copy links against the current fit, refit with them)."""
        coverage = (U != ABSTAIN).astype(np.float64).T @ w
        for rnd in range(1, self.max_rounds + 1):
            new = find_links(U, w, self.lf_output_probs(), np.exp(self.log_pi), self.dependencies, rnd,
                             min_dependency=self.min_dependency, sample=self.link_sample)
            if not new:
                break
            info = {frozenset((d.child, d.parent)): d for d in self.dependencies + new}
            self.parents = orient_forest(self.m, [(d.child, d.parent) for d in info.values()], root_score=coverage)
            # Record each link in the direction the forest uses.
            self.dependencies = [Dependency(j, p, info[frozenset((j, p))].kl, info[frozenset((j, p))].found_in_round)
                                 for j, p in enumerate(self.parents) if p >= 0]
            q = self._em(self._codes(U), w, q)
        return q

    def _test_links(self, U: np.ndarray, w: np.ndarray, q: np.ndarray, indep: tuple) -> np.ndarray:
        """Keep the links unless the unlinked LFs, as referees, side with the fit without them
        (``indep``: its codes, tables, balance, log-likelihood and posteriors); returns the posteriors kept."""
        codes_b, tables_b, log_pi_b, loglik_b, q_b = indep
        codes_a = self._codes(U)
        ll_a, ll_b = self._loglik(codes_a), self._loglik(codes_b, tables_b, log_pi_b)
        a, b, _ = referee_counts(U, w, lambda j: argmax_without(ll_a, codes_a, self.tables, j),
                                 lambda j: argmax_without(ll_b, codes_b, tables_b, j), unlinked(self.parents))
        self.links_z = round(mcnemar_z(a, b), 2)
        if self.links_z >= -MIN_LINK_Z:
            return q
        self.dropped_links, self.dependencies, self.parents = self.dependencies, [], [-1] * self.m
        self.tables, self.log_pi, self.log_likelihood = tables_b, log_pi_b, loglik_b
        return q_b

    def predict_without(self, L: np.ndarray, j: int) -> np.ndarray:
        """(n,) most probable class for votes ``L`` (n, m) with LF ``j``'s evidence left out.

        LF j must be unlinked (``referees.unlinked(self.parents)``): a linked
        LF's vote also enters its children's tables.
        """
        self._check_fitted()
        if j not in unlinked(self.parents):
            raise ValueError(f"LF {j} is linked to others; only an unlinked LF can be left out")
        codes = self._codes(np.asarray(L, dtype=np.int16))
        return argmax_without(self._loglik(codes), codes, self.tables, j)

    # -- links between LFs ---------------------------------------------------
    def lf_output_probs(self) -> np.ndarray:
        """Marginal ``P(L_j = v | Y = y)`` for every LF: (m, K+1, K), v = 0 is abstain."""
        K1 = self.K + 1
        out = np.zeros((self.m, K1, self.K))
        done = [False] * self.m
        order = topological(self.parents)
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
        U, _, inv = compress_rows(L) if self.compress and L.shape[0] and worth_compressing(L) else \
            (L, None, np.arange(L.shape[0]))
        ll = self._loglik(self._codes(U)).T / self.temperature  # (u, K)
        ll -= logsumexp(ll, axis=1, keepdims=True) if ll.shape[0] else 0.0
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

        See ``calibration.fit_temperature`` (dev NLL plus a log-normal prior on
        T, so a small, all-correct dev set cannot make the model overconfident).
        Returns T (1.0 when fewer than 2 usable dev items).
        """
        self._check_fitted()
        y_dev = np.asarray(y_dev)
        keep = np.any(np.asarray(L_dev) != ABSTAIN, axis=1) & (y_dev >= 0)
        self.temperature = 1.0
        if keep.sum() < 2:
            return self.temperature
        U = np.asarray(L_dev)[keep]
        logits = self._loglik(self._codes(U.astype(np.int16))).T  # (n, K)
        self.temperature = fit_temperature(logits, y_dev[keep], prior_scale)
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
            "prior_released": self.prior_released, "prior_agreement": self.prior_agreement,
            "log_likelihood": self.log_likelihood,
            "dependencies": [d.__dict__ for d in self.dependencies],
            "links_z": self.links_z,
            "dropped_links": [d.__dict__ for d in self.dropped_links],
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
