"""Self-training on frozen embeddings: rounds of fit, predict, keep the confident, refit.

Round r (1-based):

1. fit the classifier (``classifier.py``) on the seeds plus every
   pseudo-label of rounds < r, class-balanced, pseudo-labels weighted
   ``pseudo_weight``;
2. fit a temperature on the dev set (``calibration.fit_temperature``) and
   report dev accuracy; with a label-model output the pool's probabilities
   are combined with its posteriors as a prior (product of experts with
   weight ``prior_weight``);
3. score every pool sample's novelty (``novelty.py``) and turn it into an
   in-set score calibrated on the dev set's in-class items; samples below
   ``abstain_below`` are rejected (never pseudo-labelled, left unlabelled);
4. add pseudo-labels: per class, the samples above ``threshold``
   (``fixed``) or the most confident ``top_percent`` % of those predicted as
   that class (``top_percent``, which keeps the classes' shares); stop when
   a round adds nothing or ``max_rounds`` is reached.

The final classifier is fitted on everything kept and labels the pool. All
of it is deterministic for a seed (L-BFGS from a fixed start, seeded
subsamples, ties by index), so a run resumed from round r's saved
pseudo-labels (``RoundState``) ends exactly like an uninterrupted one.
This module works on arrays; ``selftrain_stage.py`` reads and writes datasets.

Everything here runs on CPU. Not built: the optional FixMatch-style
fine-tune of the backbone's last blocks on labelled + pseudo-labelled images
(weak/strong views through the DALI loader) -- GPU-only work that belongs
with training (``train/``, which curation must not import); its input would
be this stage's output dataset.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import logsumexp

from webcurate.shards.errors import ConfigError

from . import novelty as nov
from .calibration import fit_temperature, softmax
from .classifier import FeatureMap, balanced_weights, make_classifier
from .params import SelfTrainParams

NONE = -2  # dev label of a "none of these" example
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)
L2_DEFAULT = 0.1


@dataclass
class SelfTrainData:
    """Everything a run reads, as arrays.

    ``pool`` (n, D) embeddings of the samples to label (``pool_ok`` (n,) False
    where embedding failed); ``seed`` (s, D) with classes ``seed_y`` (s,);
    ``dev`` (d, D) with ``dev_y`` (d,) classes or ``NONE``; ``prior`` (n, K)
    label-model posteriors with ``prior_ok`` (n,) where it voted, or None.
    """

    classes: list[str]
    pool_keys: list[str]
    pool: np.ndarray
    pool_ok: np.ndarray
    seed: np.ndarray
    seed_y: np.ndarray
    dev: np.ndarray | None = None
    dev_y: np.ndarray | None = None
    prior: np.ndarray | None = None
    prior_ok: np.ndarray | None = None

    @property
    def K(self) -> int:
        return len(self.classes)

    @property
    def dev_known(self) -> np.ndarray:
        return np.zeros(0, bool) if self.dev_y is None else self.dev_y >= 0

    @property
    def dev_none(self) -> np.ndarray:
        return np.zeros(0, bool) if self.dev_y is None else self.dev_y == NONE


@dataclass
class RoundState:
    """Pseudo-labels after a round: ``label`` (n,) class or -1, ``round`` (n,) round that added it (0: none)."""

    label: np.ndarray
    round: np.ndarray
    summaries: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def empty(cls, n: int) -> "RoundState":
        return cls(np.full(n, -1, np.int64), np.zeros(n, np.int64))

    @property
    def rounds_done(self) -> int:
        return len(self.summaries)

    @property
    def stopped(self) -> bool:
        """True when the last round added nothing (no later round can)."""
        return bool(self.summaries) and self.summaries[-1]["added"] == 0

    @property
    def dev_dropped(self) -> bool:
        """True when the last round's classifier is less accurate on the dev set than an earlier one."""
        acc = [s["dev_accuracy"] for s in self.summaries]
        return len(acc) > 1 and acc[-1] is not None and acc[-1] < max(a for a in acc[:-1] if a is not None)

    def upto(self, r: int) -> "RoundState":
        """The pseudo-labels of rounds 1..r only (summaries kept)."""
        later = self.round > r
        return RoundState(np.where(later, -1, self.label), np.where(later, 0, self.round), self.summaries)


@dataclass
class Fit:
    """One fitted round: classifier, temperature, pool probabilities and novelty."""

    model: Any
    temperature: float
    logits: np.ndarray  # (n, K) pool, uncalibrated
    probs: np.ndarray  # (n, K) pool, calibrated, prior applied
    in_set: np.ndarray  # (n,) conformal in-set score
    abstain_below: float
    dev_accuracy: float | None
    dev_info: dict[str, Any]


class SelfTrainer:
    """Runs rounds over ``data`` with parameters ``p`` (see the module docstring)."""

    def __init__(self, data: SelfTrainData, p: SelfTrainParams):
        self.d, self.p = data, p
        self.fmap = FeatureMap.fit(data.pool[data.pool_ok])
        self.Xpool, self.Xseed = self.fmap(data.pool), self.fmap(data.seed)
        self.Xdev = self.fmap(data.dev) if data.dev is not None else None
        # knn novelty space: cosine after removing the pool's mean direction
        self.Cpool, self.Cseed = self.fmap.centred(data.pool), self.fmap.centred(data.seed)
        self.Cdev = self.fmap.centred(data.dev) if data.dev is not None else None
        self._l2: float | None = None

    # -- one fit ---------------------------------------------------------------
    def _train_set(self, st: RoundState) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Features, classes, weights and knn-space vectors of seeds + pseudo-labels."""
        idx = np.flatnonzero(st.label >= 0)
        X = np.concatenate([self.Xseed, self.Xpool[idx]])
        C = np.concatenate([self.Cseed, self.Cpool[idx]])
        y = np.concatenate([self.d.seed_y, st.label[idx]])
        base = np.concatenate([np.ones(len(self.d.seed_y)), np.full(len(idx), self.p.pseudo_weight)])
        return X, y, balanced_weights(y, self.d.K, base), C

    def _classifier(self, l2: float) -> Any:
        return make_classifier(self.p.classifier, self.d.K, l2=l2, hidden=self.p.hidden, max_iter=self.p.max_iter,
                               seed=self.p.random_seed)

    @property
    def l2(self) -> float:
        """The L2 strength: given, or (``auto``) the grid value whose seed-only classifier is the most
        accurate on the dev set (ties to the stronger penalty); 0.1 without a dev set."""
        if self._l2 is None:
            if self.p.l2 != "auto":
                self._l2 = float(self.p.l2)
            elif self.Xdev is None or not self.d.dev_known.any():
                self._l2 = L2_DEFAULT
            else:
                X, y, w, _ = self._train_set(RoundState.empty(len(self.d.pool_keys)))
                known = self.d.dev_known
                acc = {l2: float((self._classifier(l2).fit(X, y, w).logits(self.Xdev[known]).argmax(axis=1)
                                  == self.d.dev_y[known]).mean()) for l2 in L2_GRID}
                self._l2 = max(L2_GRID, key=lambda v: (acc[v], v))
        return self._l2

    def fit(self, st: RoundState, rnd: int) -> Fit:
        """Fit the classifier on ``st``'s training set, calibrate it and score the pool."""
        X, y, w, E = self._train_set(st)
        model = self._classifier(self.l2).fit(X, y, w)
        logits = model.logits(self.Xpool)
        T, dev_acc, dev_logits = self._calibrate(model)
        in_set, abstain, info = self._novelty(st, rnd, E, model, logits, dev_logits, T)
        return Fit(model, T, logits, self.with_prior(logits, T), in_set, abstain, dev_acc, info)

    def _calibrate(self, model: Any) -> tuple[float, float | None, np.ndarray | None]:
        """(temperature, dev accuracy, dev logits) on the dev set's in-class items (1, None without)."""
        if self.Xdev is None:
            return 1.0, None, None
        dev_logits = model.logits(self.Xdev)
        known = self.d.dev_known
        if not known.any():
            return 1.0, None, dev_logits
        T = fit_temperature(dev_logits[known], self.d.dev_y[known])
        return T, float((dev_logits[known].argmax(axis=1) == self.d.dev_y[known]).mean()), dev_logits

    def with_prior(self, logits: np.ndarray, T: float) -> np.ndarray:
        """Calibrated pool probabilities, combined with the label model's where it voted."""
        logp = logits / T - logsumexp(logits / T, axis=1, keepdims=True)
        if self.d.prior is not None and self.p.prior_weight > 0:
            ok = self.d.prior_ok
            logp[ok] += self.p.prior_weight * np.log(np.maximum(self.d.prior[ok], 1e-6))
        return np.exp(logp - logsumexp(logp, axis=1, keepdims=True))

    # -- novelty -----------------------------------------------------------------
    def _scores(self, st: RoundState, rnd: int, E: np.ndarray, model: Any, logits: np.ndarray,
                dev_logits: np.ndarray | None, T: float) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Novelty of (pool, dev, seeds-left-one-out) under the chosen score."""
        p, d = self.p, self.d
        if p.novelty == "knn":
            n_seed = len(d.seed_y)
            if p.novelty_neighbours == "seeds":
                # Pseudo-labels come from the pool: as neighbours they make pool samples look
                # less novel than the dev samples that calibrate the score.
                E = E[:n_seed]
            ref = np.arange(len(E))
            if len(E) > max(p.novelty_reference, n_seed):  # every seed, then a seeded sample of pseudo-labels
                rng = np.random.default_rng([p.random_seed, rnd])
                extra = rng.choice(np.arange(n_seed, len(E)), max(p.novelty_reference - n_seed, 0), replace=False)
                ref = np.concatenate([np.arange(n_seed), np.sort(extra)])
            R = E[ref]
            where = np.full(len(E), -1)
            where[ref] = np.arange(len(ref))
            pos = np.full(len(d.pool), -1)  # a pseudo-labelled sample in the reference is not its own neighbour
            if len(E) > n_seed:
                pos[st.label >= 0] = where[n_seed:]
            pool = nov.knn_novelty(self.Cpool, R, p.novelty_k, self_index=pos)
            dev = nov.knn_novelty(self.Cdev, R, p.novelty_k) if self.Cdev is not None else None
            seeds = nov.knn_novelty(self.Cseed, R, p.novelty_k, self_index=np.arange(n_seed))
            none = d.dev_none
            if p.none_reference and dev is not None and none.any():
                # Off-class samples like the user's "none" examples sit closer to those than to the seeds:
                # subtract the distance to them (a dev "none" example is not its own neighbour).
                N = self.Cdev[none]
                own = np.full(len(none), -1)
                own[none] = np.arange(len(N))
                pool = pool - nov.knn_novelty(self.Cpool, N, p.novelty_k)
                dev = dev - nov.knn_novelty(self.Cdev, N, p.novelty_k, self_index=own)
                seeds = seeds - nov.knn_novelty(self.Cseed, N, p.novelty_k)
            return pool, dev, seeds
        seed_logits = model.logits(self.Xseed)
        if p.novelty == "energy":
            f = lambda z: nov.energy_novelty(z, T)  # noqa: E731
        else:
            f = lambda z: nov.maxprob_novelty(softmax(z, T))  # noqa: E731
        return f(logits), (f(dev_logits) if dev_logits is not None else None), f(seed_logits)

    def _novelty(self, st: RoundState, rnd: int, E: np.ndarray, model: Any, logits: np.ndarray,
                 dev_logits: np.ndarray | None, T: float) -> tuple[np.ndarray, float, dict[str, Any]]:
        """(in-set scores of the pool, abstain_below used, calibration facts)."""
        pool, dev, seeds = self._scores(st, rnd, E, model, logits, dev_logits, T)
        known, none = self.d.dev_known, self.d.dev_none
        cal_from = "dev" if dev is not None and known.any() else "seeds (leave-one-out)"
        cal = nov.Calibration.from_scores(dev[known] if cal_from == "dev" else seeds)
        info: dict[str, Any] = {"calibrated_on": cal_from, "calibration_items": len(cal.scores)}
        a = self.p.abstain_below
        if a == "auto":
            if dev is not None and none.any():
                a, bal = nov.auto_threshold(cal.in_set(dev[known]), cal.in_set(dev[none]), self.p.keep_known)
                info.update(none_examples=int(none.sum()), dev_balanced_accuracy=bal)
            else:
                a = 0.0
                info["note"] = "no 'none' examples in the dev set: nothing rejected unless --abstain-below is set"
        if dev is not None and none.any():
            ins_none = cal.in_set(dev[none])
            info["dev_none_rejected"] = float((ins_none < float(a)).mean())
        if dev is not None and known.any():
            info["dev_known_kept"] = float((cal.in_set(dev[known]) >= float(a)).mean())
        return cal.in_set(pool), float(a), info

    # -- rounds ------------------------------------------------------------------
    def select(self, f: Fit, st: RoundState) -> np.ndarray:
        """(n,) new pseudo-label per pool sample (-1: not added this round)."""
        conf, pred = f.probs.max(axis=1), f.probs.argmax(axis=1)
        cand = self.d.pool_ok & (st.label < 0) & (f.in_set >= f.abstain_below)
        add = np.full(len(pred), -1)
        for c in range(self.d.K):
            idx = np.flatnonzero(cand & (pred == c))
            if self.p.threshold_mode == "fixed":
                keep = idx[conf[idx] >= self.p.threshold]
            else:
                n_keep = int(np.ceil(len(idx) * self.p.top_percent / 100.0))
                keep = idx[np.lexsort((idx, -conf[idx]))[:n_keep]]
            add[keep] = c
        return add

    def run_round(self, st: RoundState, rnd: int) -> tuple[RoundState, Fit]:
        """Round ``rnd``: fit, score, add pseudo-labels; returns the new state and the fit."""
        t0 = time.time()
        f = self.fit(st, rnd)
        add = self.select(f, st)
        new = add >= 0
        if rnd == 1 and not new.any() and self.p.threshold_mode == "fixed":
            best = float(f.probs[self.d.pool_ok & (f.in_set >= f.abstain_below)].max(initial=0.0))
            raise ConfigError(f"selftrain: threshold {self.p.threshold} keeps no pool sample in round 1 (the most "
                              f"confident prediction is {best:.3f}); lower --threshold or use "
                              f"--threshold-mode top_percent")
        label, rounds = st.label.copy(), st.round.copy()
        label[new], rounds[new] = add[new], rnd
        summary = self.summary(f, rnd, add, label, time.time() - t0)
        return RoundState(label, rounds, st.summaries + [summary]), f

    def done(self, st: RoundState) -> bool:
        """No more rounds: the last added nothing, or (``keep_best_round``) it made dev accuracy drop."""
        return st.stopped or (self.p.keep_best_round and st.dev_dropped)

    def final(self, st: RoundState) -> tuple[Fit, RoundState]:
        """The classifier that labels the output and the pseudo-labels it was fitted on.

        That is the fit on every pseudo-label, unless (``keep_best_round``, with a
        dev set) an earlier round's classifier was more accurate on the dev set:
        on weak embeddings pseudo-labels can make things worse, and then the
        rounds that did are left out.
        """
        f = self.fit(st, st.rounds_done + 1)
        acc = [s["dev_accuracy"] for s in st.summaries]
        if not (self.p.keep_best_round and acc and all(a is not None for a in acc) and f.dev_accuracy is not None):
            return f, st
        best = int(np.argmax(acc))  # the earliest best: fit of round best+1 used rounds 1..best
        if acc[best] <= f.dev_accuracy:
            return f, st
        used = st.upto(best)
        return self.fit(used, st.rounds_done + 1), used

    def summary(self, f: Fit, rnd: int, add: np.ndarray, label: np.ndarray, seconds: float) -> dict[str, Any]:
        """What the round did: additions per class, dev accuracy, label-model agreement, rejections."""
        d = self.d
        counts = np.bincount(add[add >= 0], minlength=d.K)
        out: dict[str, Any] = {
            "round": rnd, "added": int(counts.sum()),
            "added_per_class": {c: int(n) for c, n in zip(d.classes, counts)},
            "pseudo_labelled": int((label >= 0).sum()), "dev_accuracy": f.dev_accuracy,
            "temperature": round(f.temperature, 4), "abstain_below": f.abstain_below,
            "rejected": int((d.pool_ok & (f.in_set < f.abstain_below)).sum()),
            "label_model_agreement": self.agreement(f), "l2": self.l2, "seconds": round(seconds, 3),
        }
        return out

    def agreement(self, f: Fit) -> float | None:
        """Share of pool samples the label model voted on where the classifier (no prior) agrees with it."""
        if self.d.prior is None:
            return None
        ok = self.d.prior_ok & self.d.pool_ok
        if not ok.any():
            return None
        return float((f.logits[ok].argmax(axis=1) == self.d.prior[ok].argmax(axis=1)).mean())
