"""HTML report sections for weak labelling (``webcurate report``), from Jinja2 templates.

Importing this module registers two sections with
``webcurate.curation.report.register_section``:

- "Labelling functions" (a dataset with an ``lf_votes`` sidecar): the LF
  analysis table (polarity, coverage, overlaps, conflicts, errors) and, per
  LF, example images for each class it voted;
- "Pseudo-labels" (a dataset made by ``webcurate label`` or ``webcurate
  selftrain``): per class, the most and the least confident exported samples
  with their confidence; for self-training also the per-round table and the
  samples rejected as belonging to no class.

The markup lives in ``templates/`` (autoescaped: names and captions from the
data can never inject HTML); thumbnails come from ``curation.report`` as
ready HTML and are the only values marked safe.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import numpy as np

from webcurate.shards.dataset import Dataset

EXAMPLES = 6  # images per (LF, class) and per class
MAX_CLASSES_PER_LF = 6
LABEL_STAGES = ("label", "selftrain")


@lru_cache(maxsize=1)
def _env():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    return Environment(loader=PackageLoader("webcurate.curation.labeling", "templates"),
                       autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render(template: str, **context: Any) -> str:
    """Render one of ``templates/`` with autoescape."""
    return _env().get_template(template).render(**context)


def _images(ds: Dataset, keys: list[str], cache: Any, captions: dict[str, str] | None = None) -> Any:
    from markupsafe import Markup

    from webcurate.curation.report import image_tags

    return Markup(image_tags(ds, keys, captions, cache=cache))  # built with html.escape by the report


def lf_section(ds: Dataset) -> str | None:
    """LF statistics and example images per LF vote; None when the dataset has no votes."""
    from webcurate.curation.report import ImageCache

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
    cache = ImageCache(ds)
    keys = np.asarray(votes.keys, dtype=object)
    lfs = []
    for j, name in enumerate(names):
        col = votes.L[:, j]
        groups = [{"label": classes[c], "count": int((col == c).sum()),
                   "images": _images(ds, list(keys[col == c][:EXAMPLES]), cache)}
                  for c in [int(c) for c in np.unique(col[col >= 0])][:MAX_CLASSES_PER_LF]]
        if groups:
            lfs.append({"name": name, "groups": groups})
    return render("lf_section.html.j2", rows=rows, lfs=lfs,
                  headers=("LF", "polarity", "coverage", "overlaps", "conflicts", "votes", "errors", "first error"))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _saved_run(ds: Dataset) -> dict[str, Any]:
    """The ``label_model.json`` / ``selftrain.json`` the run wrote beside the data ({} when absent)."""
    from webcurate.shards import storage

    from .selftrain_stage import RESULT_FILE
    from .workflow import MODEL_FILE

    name = RESULT_FILE if ds.manifest.get("stage") == "selftrain" else MODEL_FILE
    try:
        return json.loads(storage.read_bytes(storage.join(ds.root, name)))
    except FileNotFoundError:
        return {}


def _lf_rows(saved: dict[str, Any]) -> list[tuple[str, ...]]:
    cols = ("name", "coverage", "overlaps", "conflicts", "correct", "incorrect", "emp_accuracy",
            "learned_accuracy", "depends_on")
    return [tuple(_fmt(s.get(c)) for c in cols) for s in saved.get("lf_stats") or []]


def _selftrain_tables(saved: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-round summary and the open-set rejection counts of a self-training run."""
    rounds = saved.get("rounds") or []
    out = []
    if rounds:
        out.append({"title": "Self-training rounds", "headers": (
            "round", "added", "added per class", "pseudo-labelled", "dev accuracy", "temperature",
            "agreement with label model"), "rows": [
            (r["round"], r["added"], ", ".join(f"{c}={n}" for c, n in r["added_per_class"].items()),
             r["pseudo_labelled"], _fmt(r.get("dev_accuracy")), _fmt(r.get("temperature")),
             _fmt(r.get("label_model_agreement"))) for r in rounds]})
    rej = saved.get("rejection") or {}
    if rej:
        out.append({"title": "Open-set rejection", "headers": ("what", "value"),
                    "rows": [(k, _fmt(v)) for k, v in rej.items() if not isinstance(v, (list, dict))]})
    return out


def _rejected_group(ds: Dataset, saved: dict[str, Any]) -> dict[str, Any] | None:
    """Thumbnails of samples rejected as no class (they are not in the output: read from the parent)."""
    from webcurate.curation.report import ImageCache

    keys = list((saved.get("rejection") or {}).get("examples") or [])
    parent = ds.manifest.get("parent")
    if not keys or not parent:
        return None
    src = Dataset(parent)
    return {"title": f"rejected as none of the classes ({saved['rejection'].get('rejected', len(keys))})",
            "images": _images(src, keys[:2 * EXAMPLES], ImageCache(src))}


def label_section(ds: Dataset) -> str | None:
    """Most and least confident samples per pseudo-label; None unless made by label or selftrain."""
    from webcurate.curation.report import ImageCache

    if ds.manifest.get("stage") not in LABEL_STAGES:
        return None
    idx = ds.index(columns=["key", "label", "label_confidence", "status"])
    rows = [r for r in idx.to_pylist() if r["status"] == "ok" and r.get("label") is not None]
    if not rows:
        return None
    saved = _saved_run(ds)
    cache = ImageCache(ds)
    by_class: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_class.setdefault(r["label"], []).append(r)
    classes = ds.manifest.get("parameters", {}).get("label_classes") or sorted(by_class)
    class_rows = [(c, len(by_class.get(c, [])),
                   f"{np.mean([r['label_confidence'] for r in by_class[c]]):.3f}" if by_class.get(c) else "-")
                  for c in classes]
    groups = []
    for c in classes:
        rs = sorted(by_class.get(c, []), key=lambda r: (-r["label_confidence"], r["key"]))
        if not rs:
            continue
        picks = rs[:EXAMPLES] + (rs[-EXAMPLES:] if len(rs) > 2 * EXAMPLES else rs[EXAMPLES:])
        caps = {r["key"]: f"{r['label_confidence']:.2f}" for r in picks}
        groups.append({"title": f"{c}: most / least confident",
                       "images": _images(ds, [r["key"] for r in picks], cache, caps)})
    rejected = _rejected_group(ds, saved)
    if rejected:
        groups.append(rejected)
    dev = saved.get("dev") or {}
    return render("label_section.html.j2", lf_rows=_lf_rows(saved), lf_headers=(
        "LF", "coverage", "overlaps", "conflicts", "dev correct", "dev incorrect", "dev accuracy",
        "learned accuracy", "copies"), dev_rows=[(k, _fmt(v)) for k, v in dev.items()],
        extra_tables=_selftrain_tables(saved), class_rows=class_rows, groups=groups)


def register() -> bool:
    """Register both sections with ``webcurate report``."""
    from webcurate.curation.report import register_section

    register_section("Labelling functions", lf_section)
    register_section("Pseudo-labels", label_section)
    return True


register()
