"""Synthetic label-model benchmark over several LF structures: ours vs majority vote vs Snorkel.

Our label model once beat majority vote only on our own generator (an
independent generator with another LF structure gave ours 0.615, majority
vote 0.664, Snorkel 0.533). So the matrices here come from six structures
(``curation/labeling/synthetic.py``, each seed draws new LFs):

- independent_copies: 4 imbalanced classes, 10 LFs, two copying others on 80 %;
- one_class_keywords: two keyword LFs per class that only vote their class
  (accuracy = precision 0.6-0.95, recall 0.2-0.6) plus one dense LF at 0.45;
- correlated_groups: groups of 4 and 3 LFs sharing one latent vote (and its
  errors) 85 % of the time, plus singletons;
- class_dependent: accuracy 0.3-0.95 per (LF, class), systematic confusions;
- high_abstain: 20 LFs with coverage 0.02-0.15;
- mixed: keyword LFs + a group of four sharing errors + class-dependent LFs, all sparse.

Methods: our label model (defaults), ``auto`` without labels (held-out LF
agreement decides label model vs majority vote) and with a 300-item dev set
(dev accuracy decides), Dawid-Skene (ours without links and prior), majority
vote, Snorkel's LabelModel (defaults, random ties). The target, per
structure: auto >= majority vote and >= Snorkel. Accuracy on the items with
at least one vote, for every method (Snorkel's labels of all-abstain rows,
drawn from its prior, are left out so all compare on the same items).

    .venv/bin/python bench/labeling_synthetic.py            # 3 seeds x 6 structures, 20,000 items
    .venv/bin/python bench/labeling_synthetic.py --quick    # 1 seed
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
from webcurate.curation.labeling.model_choice import choose_with_dev, choose_without_dev  # noqa: E402
from webcurate.curation.labeling.synthetic import STRUCTURES, structured_votes  # noqa: E402

N_DEV = 300
TOL = 0.002  # "at least as good": within this of the other (noise between equal predictions)


def acc(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    lab = pred >= 0
    return float((pred[lab] == y[lab]).mean()), float(lab.mean())


def run_one(structure: str, seed: int, n: int, with_snorkel: bool) -> dict[str, dict[str, float | str]]:
    d = structured_votes(structure, n + N_DEV, seed)
    K = len(d.class_balance)
    L, y, L_dev, y_dev = d.L[:n], d.y[:n], d.L[n:], d.y[n:]
    res: dict[str, dict[str, float | str]] = {}
    t = time.time()
    lm = LabelModel(K).fit(L)
    res["ours: label model"] = dict(zip(("acc", "cov"), acc(lm.predict(L), y)), fit_s=time.time() - t)
    mv = MajorityVote(K).fit(L)
    res["majority vote (ties -> prior)"] = dict(zip(("acc", "cov"), acc(mv.predict(L), y)))
    t = time.time()
    chosen, ev = choose_without_dev(L, K)
    pick = lm if chosen == "labelmodel" else mv
    res["ours: auto, no labels"] = dict(zip(("acc", "cov"), acc(pick.predict(L), y)), fit_s=time.time() - t,
                                        chosen=f"{chosen} (z={ev.get('z', '-')})")
    dev_lm, dev_mv = acc(lm.predict(L_dev), y_dev)[0], acc(mv.predict(L_dev), y_dev)[0]
    chosen_dev = choose_with_dev(dev_lm, dev_mv)
    pick = lm if chosen_dev == "labelmodel" else mv
    res[f"ours: auto, {N_DEV}-item dev set"] = dict(zip(("acc", "cov"), acc(pick.predict(L), y)), chosen=chosen_dev)
    ds = LabelModel(K, dependencies=False, prior_strength=0).fit(L)
    res["Dawid-Skene (ours, no links, no prior)"] = dict(zip(("acc", "cov"), acc(ds.predict(L), y)))
    res["majority vote, random ties"] = dict(zip(("acc", "cov"), acc(
        MajorityVote(K, tie_break="random", seed=seed).fit(L).predict(L), y)))
    if with_snorkel:
        s = run_snorkel(L, K, seed=seed)
        if s is not None:
            # Scored on the items with a vote, like the others (Snorkel also labels the rest at its prior).
            pred = np.where((L != -1).any(axis=1), s["pred_random"], -1)
            res["Snorkel LabelModel (default)"] = dict(zip(("acc", "cov"), acc(pred, y)), fit_s=s["fit_seconds"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--quick", action="store_true", help="1 seed")
    ap.add_argument("--structures", default=",".join(STRUCTURES))
    ap.add_argument("--no-snorkel", action="store_true")
    args = ap.parse_args()
    seeds = 1 if args.quick else args.seeds
    verdicts = []
    for structure in args.structures.split(","):
        runs = [run_one(structure, s, args.n, not args.no_snorkel) for s in range(seeds)]
        methods = list(runs[0])
        print(f"\n## {structure}: n={args.n}, mean over {seeds} seed(s)")
        print(f"| method | accuracy | coverage | per seed | chosen | fit s |\n|---|---|---|---|---|---|")
        mean = {}
        for m in methods:
            a = float(np.mean([r[m]["acc"] for r in runs]))
            mean[m] = a
            per = " ".join(f"{r[m]['acc']:.4f}" for r in runs)
            chosen = "; ".join(str(r[m]["chosen"]) for r in runs if "chosen" in r[m]) or "-"
            fit = np.mean([r[m].get("fit_s", np.nan) for r in runs])
            print(f"| {m} | {a:.4f} | {np.mean([r[m]['cov'] for r in runs]):.4f} | {per} | {chosen} | "
                  f"{'-' if np.isnan(fit) else f'{fit:.2f}'} |")
        for m in ("ours: auto, no labels", f"ours: auto, {N_DEV}-item dev set"):
            peers = [p for p in ("majority vote (ties -> prior)", "Snorkel LabelModel (default)") if p in mean]
            ok = all(min(r[m]["acc"] - r[p]["acc"] for r in runs) >= -TOL for p in peers)
            verdicts.append((structure, m, ok, {p: round(mean[m] - mean[p], 4) for p in peers}))
    print("\n## target: auto >= majority vote and >= Snorkel on every seed (tolerance "
          f"{TOL}) -- structure, method, met, mean difference")
    for v in verdicts:
        print(f"| {v[0]} | {v[1]} | {'yes' if v[2] else 'NO'} | {v[3]} |")


if __name__ == "__main__":
    main()
