"""The ``webcurate selftrain`` stage: inputs -> rounds (resumable) -> the pseudo-labelled dataset.

After each round its pseudo-labels and summary are written atomically to
``<output>/_selftrain/round-<r>.npz`` next to ``state.json`` (a fingerprint
of the parameters and inputs). A re-run with the same parameters and inputs
loads the rounds already done and continues after the last one, so a run
killed in round r redoes only round r and ends byte-identical to an
uninterrupted one (every step is deterministic for the seed); other
parameters or inputs with the same output are refused.

The output is written like ``webcurate label``'s (``pseudo_dataset``), with
stage ``selftrain``: ``label``, ``label_prob``, ``label_confidence``,
``label_sources`` = ``["selftrain:round_<r>"]`` for the round that added
it (``selftrain:final`` for labels only the final classifier gave), and
``selftrain.json`` beside it: per-round summaries, the final dev accuracy
and temperature, and the open-set rejection counts with example keys.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from webcurate.shards import storage
from webcurate.shards.dataset import DatasetError

from . import pseudo_dataset
from .params import SelfTrainParams
from .selftrain import Fit, RoundState, SelfTrainData, SelfTrainer
from .selftrain_data import load_inputs

STATE_DIR = "_selftrain"
RESULT_FILE = "selftrain.json"
REJECTED_EXAMPLES = 24


@dataclass
class SelfTrainRun:
    """What a run produced (also returned to Python callers)."""

    classes: list[str]
    keys: list[str]
    probs: np.ndarray  # (n, K) final calibrated probabilities (prior applied)
    pred: np.ndarray  # (n,) final class, -1 where rejected or not embedded
    rejected: np.ndarray  # (n,) bool: novelty below abstain_below
    state: RoundState
    final: Fit
    resumed_after: int = 0
    used: RoundState | None = None  # the pseudo-labels the final classifier was fitted on
    l2: float | None = None
    selection: pseudo_dataset.Selection | None = None
    result: dict[str, Any] = field(default_factory=dict)


# -- round state on storage ------------------------------------------------------------
def _fingerprint(p: SelfTrainParams, identity: dict[str, Any]) -> str:
    blob = json.dumps({"params": p.record(), "inputs": identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _round_uri(out: str, r: int) -> str:
    return storage.join(out, STATE_DIR, f"round-{r:04d}.npz")


def load_rounds(out: str, fingerprint: str, n: int) -> RoundState:
    """The rounds a previous run of the same fingerprint finished (empty state when none)."""
    state_uri = storage.join(out, STATE_DIR, "state.json")
    if not storage.exists(state_uri):
        return RoundState.empty(n)
    saved = json.loads(storage.read_bytes(state_uri))
    if saved.get("fingerprint") != fingerprint:
        raise DatasetError(f"{out} holds a self-training run of other parameters or inputs "
                           f"({state_uri}); choose a new --output")
    st = RoundState.empty(n)
    r = 1
    while storage.exists(_round_uri(out, r)):
        z = np.load(io.BytesIO(storage.read_bytes(_round_uri(out, r))), allow_pickle=False)
        st = RoundState(z["label"], z["round"], st.summaries + [json.loads(str(z["summary"]))])
        r += 1
    return st


def save_round(out: str, fingerprint: str, p: SelfTrainParams, st: RoundState) -> None:
    """Atomically write the state after round ``st.rounds_done``."""
    state_uri = storage.join(out, STATE_DIR, "state.json")
    if not storage.exists(state_uri):
        storage.write_bytes(state_uri, json.dumps({"fingerprint": fingerprint, "parameters": p.record()},
                                                  indent=1).encode())
    buf = io.BytesIO()
    np.savez(buf, label=st.label, round=st.round, summary=np.array(json.dumps(st.summaries[-1])))
    storage.write_bytes(_round_uri(out, st.rounds_done), buf.getvalue())


# -- the stage -------------------------------------------------------------------------
def _rounds(trainer: SelfTrainer, st: RoundState, p: SelfTrainParams, fingerprint: str | None) -> RoundState:
    """Rounds after the last one done, each saved as it finishes, until the limit or no additions."""
    from webcurate.shards.progress import progress_bar

    bar = progress_bar(total=p.max_rounds, initial=min(st.rounds_done, p.max_rounds), desc="selftrain",
                       unit="round")
    try:
        while st.rounds_done < p.max_rounds and not trainer.done(st):
            st, _ = trainer.run_round(st, st.rounds_done + 1)
            if p.output and fingerprint:
                save_round(p.output, fingerprint, p, st)
            s = st.summaries[-1]
            bar.update(1)
            bar.set_postfix_str(f"+{s['added']} (total {s['pseudo_labelled']}), dev acc {_f(s['dev_accuracy'])}")
    finally:
        bar.close()
    return st


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def run_selftrain(p: SelfTrainParams, *, quiet: bool = False) -> SelfTrainRun:
    """Self-train on ``p.input`` from the seeds in ``p.seed``; write ``p.output`` when given."""
    t0 = time.time()
    data, identity = load_inputs(p.input, p.seed, p.dev, p.labels, p.classes, p.none_label, p.embeddings)
    fingerprint = _fingerprint(p, identity)
    st = load_rounds(p.output, fingerprint, len(data.pool_keys)) if p.output else None
    if st is not None and st.rounds_done and not quiet:
        print(f"selftrain: resuming after round {st.rounds_done} (state in {storage.join(p.output, STATE_DIR)})")
    run = self_train(data, p, start=st, fingerprint=fingerprint)
    run.result = result_record(run, data, p, time.time() - t0)
    if p.output:
        export(run, data, p, quiet)
    if not quiet:
        print_summary(run, p.output)
    return run


def self_train(data: SelfTrainData, p: SelfTrainParams, *, start: RoundState | None = None,
               fingerprint: str | None = None) -> SelfTrainRun:
    """The rounds after ``start`` (saved to ``p.output`` when a fingerprint is given) and the final fit."""
    st = start if start is not None else RoundState.empty(len(data.pool_keys))
    resumed = st.rounds_done
    trainer = SelfTrainer(data, p)
    st = _rounds(trainer, st, p, fingerprint)
    final, used = trainer.final(st)
    rejected = data.pool_ok & (final.in_set < final.abstain_below)
    pred = np.where(data.pool_ok & ~rejected, final.probs.argmax(axis=1), -1)
    return SelfTrainRun(data.classes, data.pool_keys, final.probs, pred, rejected, st, final, resumed, used=used,
                        l2=trainer.l2)


def selftrain_is_complete(p: SelfTrainParams) -> bool:
    """True when ``p.output`` is a finished self-training export with these parameters."""
    from webcurate.shards import manifest as manifest_mod
    from webcurate.shards.dataset import Dataset

    if not p.output or not storage.exists(storage.join(p.output, RESULT_FILE)):
        return False
    m = manifest_mod.load(p.output) or {}
    saved = m.get("parameters") or {}
    want = manifest_mod.normalize({**p.record(), "model": "selftrain"})
    if m.get("stage") != "selftrain" or any(saved.get(k) != v for k, v in want.items()):
        return False
    n = m.get("num_shards")
    return n is not None and len(Dataset(p.output).completed_shards()) == int(n)


def sources(run: SelfTrainRun) -> list[list[str]]:
    """Per sample: the round that pseudo-labelled it with the exported class, else ``selftrain:final``."""
    st = run.used if run.used is not None else run.state
    return [[f"selftrain:round_{int(st.round[i])}" if st.label[i] == y and st.round[i] > 0 else "selftrain:final"]
            if y >= 0 else [] for i, y in enumerate(run.pred.tolist())]


def export(run: SelfTrainRun, data: SelfTrainData, p: SelfTrainParams, quiet: bool) -> None:
    """Write the pseudo-labelled dataset, ``pseudo_labels.parquet`` and ``selftrain.json``."""
    sel = pseudo_dataset.select(run.keys, run.probs, run.pred, min_confidence=p.min_confidence,
                                per_class_cap=p.per_class_cap, unlabelled_reason="rejected_or_no_embedding")
    sel.reasons["rejected_as_no_class"] = int(run.rejected.sum())
    sel.reasons["no_embedding"] = int((~data.pool_ok).sum())
    sel.reasons.pop("rejected_or_no_embedding", None)
    run.selection = sel
    fields = pseudo_dataset.label_fields(run.keys, run.probs, sel, run.classes, model_name="selftrain",
                                         sources=sources(run))
    table = pseudo_dataset.pseudo_label_table(run.keys, run.probs, run.classes, sel, round=run.state.round,
                                              in_set=run.final.in_set.astype(np.float32), rejected=run.rejected)
    params = {**p.record(), "model": "selftrain"}
    pseudo_dataset.write_pseudo_labelled_dataset(p.input, p.output, fields, table, run.classes, stage="selftrain",
                                                 parameters=params, workers=p.workers, summary=not quiet)
    storage.write_bytes(storage.join(p.output, RESULT_FILE), json.dumps(run.result, indent=1).encode())


def result_record(run: SelfTrainRun, data: SelfTrainData, p: SelfTrainParams, seconds: float) -> dict[str, Any]:
    """``selftrain.json``: rounds, the final fit, rejection counts and examples."""
    f = run.final
    rej_keys = [run.keys[i] for i in np.flatnonzero(run.rejected)[np.argsort(f.in_set[run.rejected],
                                                                              kind="stable")][:REJECTED_EXAMPLES]]
    return {
        "classes": run.classes, "rounds": run.state.summaries, "resumed_after_round": run.resumed_after,
        "final": {"dev_accuracy": f.dev_accuracy, "temperature": f.temperature,
                  "pseudo_labelled": int((run.state.label >= 0).sum()),
                  "pseudo_labels_used": int((run.used.label >= 0).sum()) if run.used is not None else None,
                  "rounds_used": int(run.used.round.max()) if run.used is not None else None,
                  "l2": run.l2, "labelled": int((run.pred >= 0).sum()), "pool": len(run.keys)},
        "dev": {"final_dev_accuracy": f.dev_accuracy, "temperature": f.temperature,
                **{k: v for k, v in f.dev_info.items() if not isinstance(v, (list, dict))}},
        "rejection": {"score": p.novelty, "abstain_below": f.abstain_below, "rejected": int(run.rejected.sum()),
                      "no_embedding": int((~data.pool_ok).sum()), **f.dev_info, "examples": rej_keys},
        "parameters": p.record(), "seconds": round(seconds, 2),
    }


def print_summary(run: SelfTrainRun, output: str | None) -> None:
    """The per-round table and the outcome."""
    from webcurate.shards.progress import print_table

    rows = [(s["round"], s["added"], ", ".join(f"{c}={k}" for c, k in s["added_per_class"].items() if k),
             s["pseudo_labelled"], _f(s["dev_accuracy"]), f"{s['temperature']:.3f}", s["rejected"],
             _f(s["label_model_agreement"])) for s in run.state.summaries]
    f = run.final
    used = run.used if run.used is not None else run.state
    r = int(used.round.max())
    rows.append((f"final ({f'pseudo-labels of rounds 1-{r}' if r else 'seeds only'})", "-", "-",
                 int((used.label >= 0).sum()),
                 _f(f.dev_accuracy), f"{f.temperature:.3f}",
                 int(run.rejected.sum()), "-"))
    print_table("selftrain: rounds", rows, ("round", "added", "added per class", "pseudo-labelled", "dev acc",
                                            "temperature", "rejected", "agrees with label model"))
    out = [("pool samples", len(run.keys)), ("labelled", int((run.pred >= 0).sum())),
           ("rejected as no class", f"{int(run.rejected.sum())} (abstain below {f.abstain_below:.3f}, "
                                    f"calibrated on {f.dev_info.get('calibrated_on')})")]
    for k in ("dev_none_rejected", "dev_known_kept"):
        if k in f.dev_info:
            out.append((k.replace("_", " "), f"{f.dev_info[k]:.3f}"))
    if run.selection is not None:
        out.append(("exported", int(run.selection.selected.sum())))
    if output:
        out.append(("output", output))
    print_table("selftrain: summary", out, ("what", "value"))
