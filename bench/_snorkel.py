"""Snorkel as the peer, called in a subprocess.

Snorkel 0.10 is in the project's test extra (it accepts our pinned torch), so
the project's own interpreter runs it when it imports; otherwise a venv is
made in bench/_work/snorkel-venv on first use with the CPU-only
``torch==2.13.0+cpu`` wheel from local disk (about 1.4 GB, a few minutes).
``run_snorkel`` writes the label matrix to .npy, runs
``bench/_snorkel_worker.py`` in a separate process (its own torch threads),
and reads back probabilities and predictions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, "_work", "snorkel-venv")
PY = os.path.join(VENV, "bin", "python")
WORKER = os.path.join(HERE, "_snorkel_worker.py")


def ensure_venv(verbose: bool = True) -> str | None:
    """Path of a python with snorkel importable (ours first, else the bench venv), or None."""
    if subprocess.run([sys.executable, "-c", "import snorkel, torch"], capture_output=True).returncode == 0:
        return sys.executable
    if os.path.exists(PY):
        ok = subprocess.run([PY, "-c", "import snorkel, torch"], capture_output=True).returncode == 0
        if ok:
            return PY
    if verbose:
        print("making the Snorkel venv (python3 -m venv + pip install torch==2.13.0+cpu snorkel) ...", file=sys.stderr)
    os.makedirs(os.path.dirname(VENV), exist_ok=True)
    py3 = "python3"
    steps = [[py3, "-m", "venv", VENV],
             [os.path.join(VENV, "bin", "pip"), "install", "-q", "torch==2.13.0+cpu", "snorkel"]]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"could not install snorkel: {' '.join(cmd)} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            return None
    return PY


def run_snorkel(L: np.ndarray, cardinality: int, *, mode: str = "labelmodel", n_epochs: int = 100,
                class_balance: list[float] | None = None, seed: int = 0, L_pred: np.ndarray | None = None,
                ) -> dict | None:
    """Fit Snorkel on ``L`` (n, m) and predict on ``L_pred`` (default L).

    mode: "labelmodel" (snorkel.labeling.model.LabelModel) or "majority"
    (MajorityLabelVoter). Returns {"probs": (n, K), "pred_random": (n,)
    (ties broken at random, Snorkel's "random" policy), "pred_abstain": (n,)
    (Snorkel's default policy: ties -> -1), "fit_seconds": float}, or None
    when Snorkel is unavailable.
    """
    py = ensure_venv()
    if py is None:
        return None
    with tempfile.TemporaryDirectory(prefix="snorkel-bench-") as d:
        np.save(os.path.join(d, "L.npy"), np.asarray(L, dtype=np.int64))
        np.save(os.path.join(d, "Lp.npy"), np.asarray(L if L_pred is None else L_pred, dtype=np.int64))
        cfg = {"cardinality": cardinality, "mode": mode, "n_epochs": n_epochs, "seed": seed,
               "class_balance": class_balance}
        with open(os.path.join(d, "cfg.json"), "w") as f:
            json.dump(cfg, f)
        t0 = time.time()
        env = dict(os.environ, OMP_NUM_THREADS="2")
        r = subprocess.run([py, WORKER, d], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"snorkel worker failed:\n{r.stderr[-3000:]}")
        out = {k: np.load(os.path.join(d, f"{k}.npy")) for k in ("probs", "pred_random", "pred_abstain")}
        with open(os.path.join(d, "timing.json")) as f:
            out.update(json.load(f))
        out["wall_seconds"] = time.time() - t0
        return out
