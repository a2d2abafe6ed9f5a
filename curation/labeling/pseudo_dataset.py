"""Writes the pseudo-labelled dataset: selection by confidence, per-class caps, the copy.

Both ``webcurate label`` and ``webcurate selftrain`` write their output here,
so every downstream consumer reads one format.

Items with no label (every LF abstained; rejected as no class) get none.
The rest get the model's most probable class; those below
``min_confidence`` are left out, and with ``per_class_cap`` each class keeps
at most that many, most confident first (ties by key, so the choice is
deterministic). Selected samples are copied with
``webcurate.shards.subset.write_subset`` (bytes untouched), their json and
index row gaining:

- ``label``: class name; ``label_index``: its index;
- ``label_prob``: the full probability vector (K floats, class order of
  ``label_classes`` in the manifest parameters);
- ``label_confidence``: the chosen class's probability;
- ``label_sources``: what made the label: the LFs that voted for the chosen
  class, or ``selftrain:round_<r>`` (the self-training round that added it;
  ``selftrain:final`` for the final classifier);
- ``label_model``: which model made the label.

``<output>/pseudo_labels.parquet`` lists every input item: key, label (null
when not labelled), label_index, confidence, probs, selected, and the
stage's own columns (num_votes for label; round, novelty, rejected for
selftrain).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from webcurate.shards import storage

PSEUDO_LABELS_FILE = "pseudo_labels.parquet"


@dataclass
class Selection:
    """Which items are exported: ``pred`` (n,) class or -1, ``confidence`` (n,), ``selected`` (n,) bool."""

    pred: np.ndarray
    confidence: np.ndarray
    selected: np.ndarray
    reasons: dict[str, int] = field(default_factory=dict)


def select(keys: Sequence[str], probs: np.ndarray, pred: np.ndarray, *, min_confidence: float = 0.0,
           per_class_cap: int | None = None, unlabelled_reason: str = "no_votes") -> Selection:
    """Choose the items to export from probabilities ``probs`` (n, K) and
    predictions ``pred`` (n,) (-1 = no label, counted as ``unlabelled_reason``)."""
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    n = len(keys)
    conf = probs[np.arange(n), np.maximum(pred, 0)] if n else np.zeros(0)
    conf = np.where(pred >= 0, conf, 0.0)
    covered = pred >= 0
    confident = covered & (conf >= min_confidence)
    sel = confident.copy()
    reasons = {unlabelled_reason: int((~covered).sum()), "below_min_confidence": int((covered & ~confident).sum())}
    capped = 0
    if per_class_cap is not None:
        if per_class_cap < 0:
            raise ValueError("per_class_cap must be >= 0")
        karr = np.asarray(keys, dtype=object)
        for c in np.unique(pred[sel]):
            idx = np.nonzero(sel & (pred == c))[0]
            if len(idx) > per_class_cap:
                order = sorted(idx.tolist(), key=lambda i: (-conf[i], karr[i]))
                drop = order[per_class_cap:]
                sel[drop] = False
                capped += len(drop)
    reasons["over_class_cap"] = capped
    return Selection(pred=pred, confidence=conf, selected=sel, reasons=reasons)


def lf_sources(L: np.ndarray, lf_names: Sequence[str], selection: Selection) -> list[list[str]]:
    """Per item, the LFs that voted for its chosen class (empty when it has no label)."""
    return [[lf_names[j] for j in np.nonzero(L[i] == y)[0]] if y >= 0 else []
            for i, y in enumerate(selection.pred.tolist())]


def label_fields(keys: Sequence[str], probs: np.ndarray, selection: Selection, classes: Sequence[str], *,
                 model_name: str, sources: Sequence[Sequence[str]]) -> dict[str, dict[str, Any]]:
    """{key: extra json/index fields} for the selected items; ``sources`` (n,) lists per item."""
    out: dict[str, dict[str, Any]] = {}
    for i in np.nonzero(selection.selected)[0]:
        y = int(selection.pred[i])
        out[keys[i]] = {
            "label": classes[y],
            "label_index": y,
            "label_prob": [round(float(p), 6) for p in probs[i]],
            "label_confidence": round(float(selection.confidence[i]), 6),
            "label_sources": list(sources[i]),
            "label_model": model_name,
        }
    return out


def pseudo_label_table(keys: Sequence[str], probs: np.ndarray, classes: Sequence[str], selection: Selection,
                       **extra: np.ndarray) -> pa.Table:
    """All items: key, label, label_index, confidence, probs (K floats), the ``extra`` (n,) columns, selected."""
    K = probs.shape[1] if probs.ndim == 2 else len(classes)
    pred = selection.pred
    flat = pa.array(probs.astype(np.float32).reshape(-1), pa.float32())
    cols: dict[str, pa.Array] = {
        "key": pa.array(list(keys), pa.string()),
        "label": pa.array([classes[p] if p >= 0 else None for p in pred.tolist()], pa.string()),
        "label_index": pa.array(pred.astype(np.int32), pa.int32()),
        "confidence": pa.array(selection.confidence.astype(np.float32), pa.float32()),
        "probs": pa.FixedSizeListArray.from_arrays(flat, K),
    }
    for name, values in extra.items():
        v = np.asarray(values)
        cols[name] = pa.array(v.astype(np.int32) if v.dtype.kind in "iu" else v)
    cols["selected"] = pa.array(selection.selected.astype(bool), pa.bool_())
    return pa.table(cols)


def write_pseudo_labelled_dataset(
    src_root: str,
    dst_root: str,
    fields: dict[str, dict[str, Any]],
    table: pa.Table,
    classes: Sequence[str],
    *,
    stage: str,
    parameters: dict[str, Any],
    workers: int | None = None,
    summary: bool = True,
) -> dict[str, Any]:
    """Copy the selected samples (``fields``: key -> label fields) to ``dst_root`` and write
    ``pseudo_labels.parquet`` (``table``); returns the new dataset's manifest."""
    from webcurate.shards.subset import write_subset
    from webcurate.shards.writer import write_parquet

    manifest = write_subset(src_root, dst_root, fields, stage=stage,
                            parameters={**parameters, "label_classes": list(classes)},
                            workers=workers, summary=summary)
    write_parquet(storage.join(dst_root, PSEUDO_LABELS_FILE), table)
    return manifest
