"""The "Quality filters" section of ``webcurate report``, from ``templates/quality_filter.html.j2``.

Shown when a dataset has a ``quality`` sidecar: one table of filters
(score column, threshold, samples removed), a histogram per score with its
thresholds drawn in, and per filter the worst removed samples (darkest,
blurriest, noisiest…, worst first) with their score, so a user can see
whether a threshold cuts junk or photos. Autoescaped: keys, captions and
error texts from the data never reach the page as markup.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from webcurate.shards.dataset import Dataset

from . import quality
from .quality_params import FilterParams

WORST = 8
BINS = 40
# filter -> (score column, parameter, True when low values fail); log-scaled columns.
FILTERS = {
    "dark": ("brightness", "min_brightness", True), "bright": ("brightness", "max_brightness", False),
    "blank": ("contrast", "min_contrast", True), "low_information": ("entropy", "min_entropy", True),
    "blurry": ("blur", "min_blur", True), "noise": ("noise", "max_noise", False),
    "grayscale": ("colorfulness", "min_colorfulness", True), "jpeg_artefacts": ("blockiness", "max_blockiness", False),
    "upscaled": ("upscale", "max_upscale", False), "small": ("short_side", "min_side", True),
    "aspect": ("aspect", "max_aspect", False), "caption_short": ("caption_chars", "min_caption_chars", True),
    "caption_long": ("caption_chars", "max_caption_chars", False),
}
LOG_COLUMNS = {"blur"}
TEXT_REASONS = ("caption_url_only", "caption_filename", "caption_no_letters", "caption_duplicate", "no_caption")


@lru_cache(maxsize=1)
def _env():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    return Environment(loader=PackageLoader("webcurate.curation", "templates"), autoescape=True,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _columns(table) -> dict[str, np.ndarray]:
    """Score columns as float64 (NaN = missing), plus short_side and aspect from the best-known size."""
    def f(name: str) -> np.ndarray:
        return np.asarray(table[name].to_numpy(zero_copy_only=False), dtype=np.float64)

    cols = {c: f(c) for c in (*quality.SCORE_COLUMNS, "caption_chars")}
    w = np.where(np.isnan(f("original_width")), f("width"), f("original_width"))
    h = np.where(np.isnan(f("original_height")), f("height"), f("original_height"))
    cols["short_side"] = np.minimum(w, h)
    with np.errstate(invalid="ignore", divide="ignore"):
        cols["aspect"] = np.maximum(w, h) / np.maximum(np.minimum(w, h), 1)
    return cols


def histogram(values: np.ndarray, title: str, thresholds: list[tuple[float, bool]], *, log: bool = False,
              width: int = 340, height: int = 110, bins: int = BINS) -> dict[str, Any] | None:
    """Bar geometry of a histogram for the template; ``thresholds``: (value, low values fail)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return None
    tr = (lambda x: np.log10(1 + np.maximum(x, 0))) if log else (lambda x: x)  # noqa: E731
    tv = tr(v)
    lo, hi = float(tv.min()), float(tv.max())
    for t, _ in thresholds:
        lo, hi = min(lo, float(tr(np.array(t)))), max(hi, float(tr(np.array(t))))
    hi = hi if hi > lo else lo + 1.0
    counts, edges = np.histogram(tv, bins=bins, range=(lo, hi))
    left = 4
    bw = (width - left) / bins
    top = max(int(counts.max()), 1)
    x_of = lambda x: round(left + (float(tr(np.array(x))) - lo) / (hi - lo) * (width - left), 1)  # noqa: E731
    bars = []
    for i, c in enumerate(counts):
        mid = (edges[i] + edges[i + 1]) / 2
        out = any((mid < tr(np.array(t))) if low else (mid > tr(np.array(t))) for t, low in thresholds)
        hgt = round(c / top * (height - 20), 1)
        raw = (10 ** edges[i] - 1, 10 ** edges[i + 1] - 1) if log else (edges[i], edges[i + 1])
        bars.append({"x": round(left + i * bw, 1), "y": round(height + 16 - hgt, 1), "w": round(bw * 0.9, 1),
                     "h": hgt, "out": out, "label": f"{raw[0]:.3g}..{raw[1]:.3g}: {int(c)}"})
    lo_raw, hi_raw = (10 ** lo - 1, 10 ** hi - 1) if log else (lo, hi)
    return {"title": title, "bars": bars, "n": int(v.size), "log": log, "width": width, "height": height,
            "left": left, "lo": f"{lo_raw:.3g}", "hi": f"{hi_raw:.3g}",
            "thresholds": [{"x": x_of(t), "label": f"{t:g}"} for t, _ in thresholds]}


def _params(ds: Dataset) -> tuple[FilterParams | None, dict[str, Any]]:
    entry = ds.manifest.get("stages", {}).get("filter", {})
    if not entry or not ds.sidecar_completed("filter"):
        return None, entry
    p = {k: v for k, v in (entry.get("parameters") or {}).items() if k in FilterParams.model_fields}
    try:
        return FilterParams.model_validate(p), entry
    except Exception:
        return None, entry


def quality_section(ds: Dataset) -> str | None:
    """The section's HTML; None when the dataset has no quality scores."""
    from markupsafe import Markup

    from webcurate.curation.report import ImageCache, image_tags

    if not ds.sidecar_completed(quality.STAGE):
        return None
    q = ds.read_sidecar(quality.STAGE)
    keys = np.asarray(q["key"].to_pylist(), dtype=object)
    cols = _columns(q)
    p, entry = _params(ds)
    shown = p or FilterParams()
    reasons: dict[str, str] = {}
    if p is not None:
        f = ds.read_sidecar("filter", columns=["key", "reason"])
        reasons = {k: r for k, r in zip(f["key"].to_pylist(), f["reason"].to_pylist()) if r}
    failed_by: dict[str, list[int]] = {}
    pos = {k: i for i, k in enumerate(keys)}
    for k, r in reasons.items():
        for name in r.split(","):
            failed_by.setdefault(name, []).append(pos[k]) if k in pos else None
    rows, hists, per_col = [], [], {}
    for name, (col, param, low) in FILTERS.items():
        limit = getattr(shown, param)
        off = limit is None or name in shown.skip
        rows.append({"name": name, "score": col, "threshold": "off" if off else f"{'<' if low else '≥' if name == 'upscaled' else '>'} {limit:g}",
                     "removed": len(failed_by.get(name, [])) if p is not None else "-"})
        if not off:
            per_col.setdefault(col, []).append((float(limit), low))
    for col in (*quality.SCORE_COLUMNS, "short_side", "aspect", "caption_chars"):
        h = histogram(cols[col], col, per_col.get(col, []), log=col in LOG_COLUMNS)
        if h is not None:
            hists.append(h)
    cache = ImageCache(ds)
    groups = []
    for name in [*FILTERS, *TEXT_REASONS, "undecodable", *sorted(n for n in failed_by if n.startswith("score_"))]:
        idx = [i for i in failed_by.get(name, []) if cache.readable(keys[i])]
        if not idx:
            continue
        if name == "undecodable":
            err = dict(zip(q["key"].to_pylist(), q["error"].to_pylist()))
            groups.append({"title": f"undecodable ({len(failed_by[name])})", "errors":
                           [(keys[i], err.get(keys[i]) or "") for i in idx[:WORST]], "images": ""})
            continue
        col, _, low = FILTERS.get(name, (None, None, True))
        if col is not None:
            order = np.argsort(cols[col][idx] if low else -cols[col][idx], kind="stable")
            idx = [idx[j] for j in order]
        chosen = [str(keys[i]) for i in idx[:WORST]]
        caps = {keys[i]: f"{col} {cols[col][i]:.3g}" for i in idx[:WORST]} if col else _captions(ds, chosen)
        groups.append({"title": f"{name}: {len(failed_by[name])} removed, worst first" if col
                       else f"{name}: {len(failed_by[name])} removed", "errors": None,
                       "images": Markup(image_tags(ds, chosen, caps, cache=cache))})
    total = int(q.num_rows)
    return _env().get_template("quality_filter.html.j2").render(
        refused=entry.get("refused"), decided=p is not None, rows=rows, hists=hists, groups=groups,
        total=total, kept=total - len(reasons) if p is not None else total)


def _captions(ds: Dataset, keys: list[str]) -> dict[str, str]:
    idx = ds.index(columns=["key", "caption"]) if keys else None
    if idx is None or "caption" not in idx.column_names:
        return {}
    want = set(keys)
    return {k: c for k, c in zip(idx["key"].to_pylist(), idx["caption"].to_pylist()) if k in want and c}


def register() -> bool:
    """Add the section to ``webcurate report``."""
    from webcurate.curation.report import register_section

    register_section("Quality filters", quality_section)
    return True


register()
