"""Synthetic label-model benchmark (issue 5): ours vs majority vote vs Snorkel.

20,000 items, 4 classes with balance [0.4, 0.3, 0.2, 0.1], 10 LFs with
coverage drawn from 0.2-0.8 and accuracy from 0.55-0.9 (a wrong vote is
uniform over the other classes), LFs 8 and 9 copying LFs 0 and 1 on 80 % of
the items (abstains included). Several seeds; each seed draws new LFs.

Reported per method: accuracy on the items it labels, coverage (items with a
label / all items), expected calibration error (10 bins) and Brier score of
the probabilities, fit time. Snorkel runs in its own venv (bench/_snorkel.py).

    .venv/bin/python bench/labeling_synthetic.py            # 5 seeds
    .venv/bin/python bench/labeling_synthetic.py --quick    # 2 seeds
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _snorkel import run_snorkel  # noqa: E402

from webcurate.curation.labeling.label_model import LabelModel, MajorityVote  # noqa: E402
from webcurate.curation.labeling.synthetic import make_votes  # noqa: E402


def scores(pred: np.ndarray, y: np.ndarray, probs: np.ndarray | None, voted: np.ndarray) -> dict[str, float]:
    """accuracy on labelled items, coverage, ECE and Brier on items with votes."""
    lab = pred >= 0
    out = {"acc": float((pred[lab] == y[lab]).mean()), "cov": float(lab.mean())}
    if probs is not None:
        P, t = probs[voted], y[voted]
        conf = P.max(axis=1)
        correct = P.argmax(axis=1) == t
        bins = np.clip((conf * 10).astype(int), 0, 9)
        out["ece"] = float(sum(abs(correct[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean()
                               for b in range(10) if (bins == b).any()))
        onehot = np.eye(P.shape[1])[t]
        out["brier"] = float(((P - onehot) ** 2).sum(axis=1).mean())
    return out


def run_seed(seed: int, n: int, with_snorkel: bool) -> dict[str, dict[str, float]]:
    d = make_votes(n=n, seed=seed)
    L, y = d.L, d.y
    voted = (L != -1).any(axis=1)
    res: dict[str, dict[str, float]] = {}
    t = time.time()
    ours = LabelModel(4).fit(L)
    fit = time.time() - t
    res["ours (labelmodel)"] = {**scores(ours.predict(L), y, ours.predict_proba(L), voted), "fit_s": fit}
    t = time.time()
    ml = LabelModel(4, prior_strength=0).fit(L)
    res["ours, prior_strength=0 (plain EM)"] = {**scores(ml.predict(L), y, ml.predict_proba(L), voted),
                                                "fit_s": time.time() - t}
    t = time.time()
    ds = LabelModel(4, dependencies=False).fit(L)
    res["ours, no copy links (plain Dawid-Skene)"] = {**scores(ds.predict(L), y, ds.predict_proba(L), voted),
                                                      "fit_s": time.time() - t}
    mv = MajorityVote(4).fit(L)
    res["majority vote, ties -> prior (ours)"] = scores(mv.predict(L), y, mv.predict_proba(L), voted)
    mvr = MajorityVote(4, tie_break="random", seed=seed).fit(L)
    res["majority vote, random ties"] = scores(mvr.predict(L), y, mvr.predict_proba(L), voted)
    if with_snorkel:
        s = run_snorkel(L, 4, seed=seed)
        if s is not None:
            res["snorkel LabelModel (default)"] = {**scores(s["pred_random"], y, s["probs"], voted),
                                                   "fit_s": s["fit_seconds"]}
            res["snorkel LabelModel (default), abstain ties"] = scores(s["pred_abstain"], y, None, voted)
            s2 = run_snorkel(L, 4, seed=seed, n_epochs=500, class_balance=[0.4, 0.3, 0.2, 0.1])
            res["snorkel LabelModel (500 epochs, true balance)"] = {
                **scores(s2["pred_random"], y, s2["probs"], voted), "fit_s": s2["fit_seconds"]}
            s3 = run_snorkel(L, 4, seed=seed, mode="majority")
            res["snorkel MajorityLabelVoter, random ties"] = scores(s3["pred_random"], y, s3["probs"], voted)
    res["_truth"] = {"lf_acc_err": float(np.abs(ml.lf_accuracies() - d.accuracies).max()),
                     "links": ",".join(f"{c}<-{p}" for c, p in sorted((x.child, x.parent) for x in ours.dependencies))}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--quick", action="store_true", help="2 seeds")
    ap.add_argument("--no-snorkel", action="store_true")
    args = ap.parse_args()
    seeds = 2 if args.quick else args.seeds
    runs = [run_seed(s, args.n, not args.no_snorkel) for s in range(seeds)]
    methods = [k for k in runs[0] if not k.startswith("_")]
    print(f"\nSynthetic: n={args.n}, 4 classes [.4,.3,.2,.1], 10 LFs, 2 copying at 80 %; mean over {seeds} seeds")
    print(f"{'method':48s} {'accuracy':>9s} {'coverage':>9s} {'ECE':>7s} {'Brier':>7s} {'fit s':>7s}")
    mean = {}
    for m in methods:
        vals = {k: np.mean([r[m][k] for r in runs]) for k in runs[0][m]}
        mean[m] = vals
        print(f"{m:48s} {vals['acc']:9.4f} {vals['cov']:9.4f} "
              f"{vals.get('ece', float('nan')):7.4f} {vals.get('brier', float('nan')):7.4f} "
              f"{vals.get('fit_s', float('nan')):7.2f}")
    print("per seed accuracy:")
    for m in methods:
        print(f"  {m:46s} " + " ".join(f"{r[m]['acc']:.4f}" for r in runs))
    print("learned LF accuracy max error per seed (prior_strength=0):", " ".join(f"{r['_truth']['lf_acc_err']:.3f}" for r in runs))
    print("copy links found per seed:", " | ".join(r["_truth"]["links"] for r in runs))
    ours = mean["ours (labelmodel)"]["acc"]
    for m in methods:
        if m != "ours (labelmodel)":
            print(f"ratio ours / {m}: {ours / mean[m]['acc']:.3f}  (error ratio "
                  f"{(1 - ours) / max(1 - mean[m]['acc'], 1e-9):.2f})")


if __name__ == "__main__":
    main()
