"""Runs inside the Snorkel venv (see _snorkel.py): fit + predict, arrays via .npy."""
import json
import os
import sys
import time

import numpy as np

d = sys.argv[1]
cfg = json.load(open(os.path.join(d, "cfg.json")))
L = np.load(os.path.join(d, "L.npy"))
Lp = np.load(os.path.join(d, "Lp.npy"))
K = cfg["cardinality"]
t0 = time.process_time()
w0 = time.time()
if cfg["mode"] == "majority":
    from snorkel.labeling.model import MajorityLabelVoter

    model = MajorityLabelVoter(cardinality=K)
else:
    from snorkel.labeling.model import LabelModel

    model = LabelModel(cardinality=K, verbose=False)
    kw = {"n_epochs": cfg["n_epochs"], "seed": cfg["seed"], "progress_bar": False}
    if cfg.get("class_balance"):
        kw["class_balance"] = cfg["class_balance"]
    model.fit(L_train=L, **kw)
fit_wall, fit_cpu = time.time() - w0, time.process_time() - t0
probs = model.predict_proba(Lp)
np.save(os.path.join(d, "probs.npy"), probs)
np.save(os.path.join(d, "pred_random.npy"), model.predict(Lp, tie_break_policy="random"))
np.save(os.path.join(d, "pred_abstain.npy"), model.predict(Lp, tie_break_policy="abstain"))
json.dump({"fit_seconds": fit_wall, "fit_cpu_seconds": fit_cpu}, open(os.path.join(d, "timing.json"), "w"))
