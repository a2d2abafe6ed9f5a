"""HTML report sections for weak labelling (``webcurate report``).

Importing this module registers two sections with
``webcurate.curation.report.register_section``:

- "Labelling functions" (a dataset with an ``lf_votes`` sidecar): the LF
  analysis table (polarity, coverage, overlaps, conflicts, errors) and, per
  LF, example images for each class it voted;
- "Pseudo-labels" (a dataset made by ``webcurate label``): per class, the
  most and the least confident exported samples with their confidence.
"""
from __future__ import annotations

import html
from typing import Any

import numpy as np

from webcurate.shards.dataset import Dataset

EXAMPLES = 6  # images per (LF, class) and per class
MAX_CLASSES_PER_LF = 6


def _table(rows: list[tuple[Any, ...]], headers: tuple[str, ...]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def lf_section(ds: Dataset) -> str | None:
    """LF statistics and example images per LF vote; None when the dataset has no votes."""
    from webcurate.curation.report import ImageCache, image_tags

    from .analysis import lf_stats
    from .apply import STAGE, read_votes, stage_summary

    if not ds.sidecar_completed(STAGE):
        return None
    params = ds.manifest.get("stages", {}).get(STAGE, {}).get("parameters", {})
    names, classes = list(params.get("lfs", [])), list(params.get("classes", []))
    if not names or not classes:
        return None
    votes = read_votes(ds, names)
    summary = stage_summary(ds, STAGE, names)
    stats = lf_stats(votes.L, names, classes, errors=summary.errors)
    rows = [(s.name, ",".join(s.polarity) or "-", f"{s.coverage:.3f}", f"{s.overlaps:.3f}", f"{s.conflicts:.3f}",
             s.votes, s.errors, summary.first_errors.get(s.name, "")) for s in stats]
    out = [_table(rows, ("LF", "polarity", "coverage", "overlaps", "conflicts", "votes", "errors", "first error"))]
    cache = ImageCache(ds)
    keys = np.asarray(votes.keys, dtype=object)
    for j, name in enumerate(names):
        col = votes.L[:, j]
        groups = []
        for c in [int(c) for c in np.unique(col[col >= 0])][:MAX_CLASSES_PER_LF]:
            ks = list(keys[col == c][:EXAMPLES])
            groups.append(f'<div class="group"><h4>votes {html.escape(classes[c])} '
                          f'({int((col == c).sum())})</h4><div class="grid">{image_tags(ds, ks, cache=cache)}</div></div>')
        if groups:
            out.append(f"<h3>{html.escape(name)}</h3>" + "".join(groups))
    return "".join(out)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _analysis_tables(ds: Dataset) -> list[str]:
    """The run's LF analysis (with dev accuracy when `--dev` was given) and its dev
    summary, from the ``label_model.json`` that `webcurate label` wrote beside the data."""
    import json

    from webcurate.shards import storage

    from .workflow import MODEL_FILE

    try:
        saved = json.loads(storage.read_bytes(storage.join(ds.root, MODEL_FILE)))
    except FileNotFoundError:
        return []
    out = []
    stats = saved.get("lf_stats") or []
    if stats:
        cols = ("name", "coverage", "overlaps", "conflicts", "correct", "incorrect", "emp_accuracy",
                "learned_accuracy", "depends_on")
        rows = [tuple(_fmt(s.get(c)) for c in cols) for s in stats]
        out.append("<h3>LF analysis of this run</h3>" + _table(rows, (
            "LF", "coverage", "overlaps", "conflicts", "dev correct", "dev incorrect", "dev accuracy",
            "learned accuracy", "copies")))
    dev = saved.get("dev") or {}
    if dev:
        out.append("<h3>Dev set</h3>" + _table([(k, _fmt(v)) for k, v in dev.items()], ("what", "value")))
    return out


def label_section(ds: Dataset) -> str | None:
    """Most and least confident samples per pseudo-label; None unless made by `webcurate label`."""
    from webcurate.curation.report import ImageCache, image_tags

    if ds.manifest.get("stage") != "label":
        return None
    idx = ds.index(columns=["key", "label", "label_confidence", "status"])
    rows = [r for r in idx.to_pylist() if r["status"] == "ok" and r.get("label") is not None]
    if not rows:
        return None
    cache = ImageCache(ds)
    out = _analysis_tables(ds)
    by_class: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_class.setdefault(r["label"], []).append(r)
    classes = ds.manifest.get("parameters", {}).get("label_classes") or sorted(by_class)
    table = [(c, len(by_class.get(c, [])),
              f"{np.mean([r['label_confidence'] for r in by_class[c]]):.3f}" if by_class.get(c) else "-")
             for c in classes]
    out.append(_table(table, ("class", "samples", "mean confidence")))
    for c in classes:
        rs = sorted(by_class.get(c, []), key=lambda r: (-r["label_confidence"], r["key"]))
        if not rs:
            continue
        picks = rs[:EXAMPLES] + (rs[-EXAMPLES:] if len(rs) > 2 * EXAMPLES else rs[EXAMPLES:])
        caps = {r["key"]: f"{r['label_confidence']:.2f}" for r in picks}
        out.append(f'<div class="group"><h4>{html.escape(c)}: most / least confident</h4><div class="grid">'
                   f'{image_tags(ds, [r["key"] for r in picks], caps, cache=cache)}</div></div>')
    return "".join(out)


def register() -> bool:
    """Register both sections with the report; False when the report module is absent."""
    try:
        from webcurate.curation.report import register_section
    except ImportError:
        return False
    register_section("Labelling functions", lf_section)
    register_section("Pseudo-labels", label_section)
    return True


register()
