"""``webcurate report``: one self-contained HTML page about a dataset.

Rendered from the Jinja2 templates in ``curation/templates/`` with autoescape
on, so keys, captions and paths from the web can never inject markup. Images
are inlined as base64 JPEG thumbnails and charts as inline SVG, so the file
can be mailed or opened from S3 with nothing beside it. Sections appear when
their data exists:

- overview: sample counts by status, and every stage with its counts;
- embeddings: model, health (do the vectors separate images?) and the
  copy-threshold calibration;
- cluster sizes before and after balanced sampling (log scale), cluster grids
  (largest first), duplicate groups (kept sample first, then what was dropped
  with its cosine) and retrieval hits next to their seeds;
- sections other stages add with ``register_section(name, fn)`` where
  ``fn(dataset) -> str | None`` returns an HTML fragment (or None to skip);
  ``image_tags(dataset, keys)`` gives them thumbnails to embed.

To stay cheap on large datasets, images are read from at most ``MAX_SHARDS``
shards (a shard is one tar download); samples are picked from those first.
"""
from __future__ import annotations

import base64
import io
import time
from collections import Counter, defaultdict
from functools import lru_cache
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow.compute as pc

from webcurate.shards import storage
from webcurate.shards.dataset import Dataset

MAX_SHARDS = 16
THUMB = 96
MAX_BARS = 300

SectionFn = Callable[[Dataset], "str | None"]
_SECTIONS: dict[str, SectionFn] = {}


def register_section(name: str, fn: SectionFn) -> None:
    """Add (or replace) a report section: ``fn(dataset)`` returns HTML or None to leave it out.

    Sections are shown after the built-in ones, in registration order, under an
    ``<h2>`` with ``name``. An exception in ``fn`` is shown in its section
    instead of failing the whole report.
    """
    _SECTIONS[name] = fn


def registered_sections() -> dict[str, SectionFn]:
    return dict(_SECTIONS)


@lru_cache(maxsize=1)
def _env():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    return Environment(loader=PackageLoader("webcurate.curation", "templates"), autoescape=True,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _macro(name: str, context: Any):
    """A built-in section macro rendered with its context, as Markup."""
    from markupsafe import Markup

    return Markup(getattr(_env().get_template("report_sections.html.j2").module, name)(context))


# -- images --------------------------------------------------------------------

def _thumb(data: bytes, size: int = THUMB) -> str | None:
    """A data: URI holding a JPEG thumbnail of ``data`` (None when it does not decode)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except Exception:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class ImageCache:
    """Loads thumbnails of keys from one dataset, reading each shard at most once."""

    def __init__(self, ds: Dataset, max_shards: int = MAX_SHARDS):
        self.ds = ds
        idx = ds.index(columns=["key", "shard"])
        self.shard_of: dict[str, int] = dict(zip(idx["key"].to_pylist(), idx["shard"].to_pylist()))
        self.allowed = set(sorted(set(self.shard_of.values()))[:max_shards])
        self.thumbs: dict[str, str | None] = {}

    def readable(self, key: str) -> bool:
        return self.shard_of.get(key) in self.allowed

    def load(self, keys: Iterable[str]) -> dict[str, str | None]:
        """Thumbnails (data: URIs, None when not loadable) of ``keys``, each shard read once per call."""
        keys = list(keys)
        want: dict[int, set[str]] = defaultdict(set)
        for k in keys:
            s = self.shard_of.get(k)
            if k not in self.thumbs and s is not None and s in self.allowed:
                want[s].add(k)
        for s, ks in sorted(want.items()):
            for sample in self.ds.iter_samples(s, keys=ks):
                self.thumbs[sample.key] = _thumb(sample.image)
            for k in ks:
                self.thumbs.setdefault(k, None)
        return {k: self.thumbs.get(k) for k in keys}


def figures(cache: ImageCache, keys: list[str], captions: dict[str, str] | None = None,
            cls: str = "") -> list[dict[str, Any]]:
    """Template context of thumbnails for ``keys`` (placeholder when not loadable)."""
    thumbs = cache.load(keys)
    return [{"uri": thumbs.get(k), "key": k, "caption": (captions or {}).get(k), "cls": cls} for k in keys]


def image_tags(ds: Dataset, keys: list[str], captions: dict[str, str] | None = None,
               cache: ImageCache | None = None):
    """HTML ``<figure>``s (Markup) with inline thumbnails of ``keys``, for registered sections."""
    return _macro("figures", figures(cache or ImageCache(ds), keys, captions))


# -- charts --------------------------------------------------------------------

def size_chart(series: dict[str, np.ndarray], title: str, width: int = 720, height: int = 180) -> dict[str, Any]:
    """Bar geometry of cluster sizes sorted by the first series (log scale), for the template.

    series: name -> (K,) sizes of the same K clusters; more than MAX_BARS
    clusters are averaged into MAX_BARS rank buckets.
    """
    names = list(series)
    order = np.argsort(-np.asarray(series[names[0]], dtype=np.float64), kind="stable")
    k = len(order)
    bars = min(k, MAX_BARS)
    edges = np.linspace(0, k, bars + 1).astype(int)
    colours = ["#9aa5b1", "#2f6fde", "#d9822b"]
    top = max(float(np.asarray(v).max()) if len(v) else 1.0 for v in series.values())
    scale = np.log1p(max(top, 1.0))
    bw = (width - 50) / max(bars, 1)
    rects = []
    for si, name in enumerate(names):
        vals = np.asarray(series[name], dtype=np.float64)[order]
        for b in range(bars):
            v = vals[edges[b]:max(edges[b + 1], edges[b] + 1)].mean()
            h = (np.log1p(v) / scale) * (height - 10) if v > 0 else 0
            rects.append({"x": round(45 + b * bw + (si * bw * 0.25 if len(names) > 1 else 0), 1),
                          "y": round(height + 20 - h, 1), "w": round(max(bw * (0.7 if len(names) > 1 else 0.9), 0.5), 1),
                          "h": round(h, 1), "fill": colours[si % 3], "opacity": 0.9 if si else 0.6})
    return {"title": title, "width": width, "height": height, "top": int(top), "k": k, "rects": rects,
            "legend": [{"x": 60 + si * 150, "fill": colours[si % 3], "name": n} for si, n in enumerate(names)]}


# -- sections ------------------------------------------------------------------

def _overview(ds: Dataset, ctx: dict) -> dict[str, Any]:
    m = ds.manifest
    by_status = Counter(ds.index(columns=["status"])["status"].to_pylist())
    rows = [("samples", sum(by_status.values()))] + [(f"status {k}", v) for k, v in sorted(by_status.items())]
    rows += [("shards complete", f"{len(ds.completed_shards())} / {ds.num_shards}"),
             ("made by", f"{m.get('stage')} (parent: {m.get('parent') or '-'})")]
    stages = [(name, len(e.get("completed_shards", [])), ", ".join(f"{k} {v}" for k, v in (e.get("counts") or {}).items()),
               e.get("finished") or "not finished") for name, e in sorted((m.get("stages") or {}).items())]
    return {"rows": rows, "stages": stages}


def _embeddings(ds: Dataset, ctx: dict) -> dict[str, Any] | None:
    e = (ds.manifest.get("stages") or {}).get("embeddings")
    if not e or not ds.sidecar_completed("embeddings"):
        return None
    health = e.get("health") or {}
    cal = e.get("calibration") or {}
    flat = [(k, v) for k, v in cal.items() if k not in ("rule", "recall_by_augmentation")]
    flat += [(f"copy recall: {k}", v) for k, v in (cal.get("recall_by_augmentation") or {}).items()]
    return {"model": e.get("model"), "dim": e.get("dim"), "image_size": e.get("image_size"),
            "weights": f"{e.get('weights_source')} {str(e.get('weights_sha256'))[:19]}",
            "health": [(k, v) for k, v in health.items() if k != "warning"], "health_warning": health.get("warning"),
            "calibration": flat, "rule": cal.get("rule", "")}


def _clusters_table(ds: Dataset):
    if not ds.sidecar_completed("clusters"):
        return None
    from .cluster import STATUS_OK, level_columns

    t = ds.read_sidecar("clusters")
    t = t.filter(pc.equal(t["status"], STATUS_OK))
    sel = None
    if ds.sidecar_completed("sample"):
        s = ds.read_sidecar("sample", columns=["key", "selected"])
        chosen = {k for k, v in zip(s["key"].to_pylist(), s["selected"].to_pylist()) if v}
        sel = np.fromiter((k in chosen for k in t["key"].to_pylist()), dtype=bool, count=t.num_rows)
    return t, level_columns(t), sel


def _cluster_sizes(ds: Dataset, ctx: dict) -> dict[str, Any] | None:
    if ctx["clusters"] is None:
        return None
    t, lvl, sel = ctx["clusters"]
    levels = []
    for col in ([lvl[0], lvl[-1]] if len(lvl) > 1 else lvl):
        ids = t[col].to_numpy(zero_copy_only=False)
        before = np.bincount(ids, minlength=int(ids.max()) + 1 if len(ids) else 0)
        present = before > 0
        series = {"all clustered": before[present]}
        rows = [("clusters (non-empty)", int(present.sum())), ("largest", int(before.max())),
                ("median", float(np.median(before[present]))), ("smallest", int(before[present].min()))]
        if sel is not None:
            after = np.bincount(ids[sel], minlength=len(before))[present]
            series["after balanced sampling"] = after
            rows += [("after sampling: largest", int(after.max())), ("after sampling: median", float(np.median(after))),
                     ("after sampling: clusters represented", int((after > 0).sum()))]
        levels.append({"name": col, "rows": rows, "chart": size_chart(series, f"{col}: samples per cluster")})
    return {"levels": levels}


def _cluster_grid(ds: Dataset, ctx: dict, max_clusters: int = 12, per_cluster: int = 8) -> dict[str, Any] | None:
    if ctx["clusters"] is None:
        return None
    t, lvl, sel = ctx["clusters"]
    cache: ImageCache = ctx["images"]
    ids = t[lvl[-1]].to_numpy(zero_copy_only=False)
    keys = t["key"].to_pylist()
    dist = t["distance"].to_numpy(zero_copy_only=False)
    sizes = np.bincount(ids)
    picked = []
    for c in np.argsort(-sizes, kind="stable")[:max_clusters]:
        if sizes[c] == 0:
            continue
        members = np.flatnonzero(ids == c)
        readable = np.fromiter((cache.readable(keys[i]) for i in members), dtype=bool, count=len(members))
        chosen = sel[members] if sel is not None else np.zeros(len(members), bool)
        order = np.lexsort((dist[members], ~chosen, ~readable))[:per_cluster]
        caps = {keys[members[i]]: f"{'✓ ' if chosen[i] else ''}d={dist[members[i]]:.2f}" for i in order}
        n_sel = f", {int(chosen.sum())} sampled" if sel is not None else ""
        picked.append((f"{lvl[-1]} = {int(c)}: {int(sizes[c])} samples{n_sel}", [keys[members[i]] for i in order], caps))
    cache.load(k for _, ks, _ in picked for k in ks)  # one pass over the shards for every grid
    return {"sampled": sel is not None,
            "groups": [{"title": title, "figures": figures(cache, ks, caps)} for title, ks, caps in picked]}


def _duplicates(ds: Dataset, ctx: dict, max_groups: int = 10, per_group: int = 6) -> dict[str, Any] | None:
    if not ds.sidecar_completed("dedup"):
        return None
    t = ds.read_sidecar("dedup")
    keys, keep = t["key"].to_pylist(), t["keep"].to_pylist()
    col = lambda name: t[name].to_pylist() if name in t.column_names else [None] * len(keys)  # noqa: E731
    dup_of, sim, reason = col("duplicate_of"), col("similarity"), col("reason")
    local = set(keys)
    groups: dict[str, list[int]] = defaultdict(list)
    external: Counter = Counter()
    for i, (kp, d) in enumerate(zip(keep, dup_of)):
        if kp or d is None:
            continue
        if d in local:
            groups[d].append(i)
        else:
            external[reason[i] or "other"] += 1
    cache: ImageCache = ctx["images"]
    ranked = sorted(groups.items(), key=lambda kv: (not cache.readable(kv[0]), -len(kv[1]), kv[0]))[:max_groups]
    shown = []
    for kept, members in ranked:
        members = sorted(members, key=lambda i: -(sim[i] or 0))[:per_group - 1]
        caps = {kept: "kept", **{keys[i]: f"{reason[i] or 'dup'} {sim[i]:.3f}" if sim[i] is not None
                                 else (reason[i] or "dup") for i in members}}
        shown.append((f"{len(groups[kept]) + 1} copies", [kept] + [keys[i] for i in members], caps))
    cache.load(k for _, ks, _ in shown for k in ks)
    entry = (ds.manifest.get("stages") or {}).get("dedup") or {}
    decision = [(k, entry[k]) for k in ("method", "threshold", "threshold_source", "components", "largest_components",
                                        "removed_share") if k in entry]
    return {"removed": sum(1 for kp in keep if not kp), "total": len(keys), "n_groups": len(groups),
            "external": ", ".join(f"{r} {n}" for r, n in external.items()), "decision": decision,
            "groups": [{"title": title, "figures": figures(cache, ks, caps)} for title, ks, caps in shown]}


def _retrieval(ds: Dataset, ctx: dict, max_seeds: int = 10, per_seed: int = 6) -> dict[str, Any] | None:
    if not ds.sidecar_completed("retrieve"):
        return None
    t = ds.read_sidecar("retrieve")
    rows = t.filter(pc.fill_null(t["selected"], False)).to_pylist()
    by_seed: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        by_seed[(r.get("seed_dataset") or "", r.get("seed_key") or "")].append(r)
    cache: ImageCache = ctx["images"]
    top = [(sk, sorted(hits, key=lambda r: -(r.get("score") or 0))[:per_seed], len(hits))
           for sk, hits in sorted(by_seed.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:max_seeds]]
    cache.load(r["key"] for _, hits, _ in top for r in hits)  # one pass over the pool's shards
    seed_figs: dict[tuple[str, str], dict] = {}
    for seed_ds in sorted({sd for (sd, _), _, _ in top}):
        wanted = [sk for (sd, sk), _, _ in top if sd == seed_ds]
        try:
            got = figures(ImageCache(Dataset(seed_ds)), wanted, {k: f"seed {k}" for k in wanted}, "seed")
        except Exception:  # the seed dataset may be gone or unreadable; show the hits anyway
            got = [{"uri": None, "key": k, "caption": f"seed {k}", "cls": "seed"} for k in wanted]
        seed_figs.update({(seed_ds, f["key"]): f for f in got})
    seeds = [{"seed_key": sk, "seed_ds": sd, "hits": n, "seed": seed_figs[(sd, sk)],
              "figures": figures(cache, [r["key"] for r in hits], {r["key"]: f"{r.get('score') or 0:.3f}" for r in hits})}
             for (sd, sk), hits, n in top]
    return {"selected": len(rows), "total": t.num_rows, "seeds": seeds}


_BUILTIN = (("Overview", "overview", _overview), ("Embeddings", "embeddings", _embeddings),
            ("Cluster sizes", "cluster_sizes", _cluster_sizes), ("Clusters", "clusters", _cluster_grid),
            ("Duplicates", "duplicates", _duplicates), ("Retrieval", "retrieval", _retrieval))


def build_report(root: str, *, max_shards: int = MAX_SHARDS) -> str:
    """The report of dataset ``root`` as an HTML string."""
    from markupsafe import Markup

    import webcurate.curation.labeling.report_section  # noqa: F401  (registers the labelling sections)
    import webcurate.curation.quality_report  # noqa: F401  (registers the quality-filter section)

    ds = Dataset(root)
    _ = ds.manifest  # clear error when it is not a dataset
    ctx: dict[str, Any] = {"images": ImageCache(ds, max_shards=max_shards), "clusters": _clusters_table(ds)}
    parts: list[tuple[str, Callable[[], Any]]] = [
        (name, lambda macro=macro, fn=fn: (lambda c: c and _macro(macro, c))(fn(ds, ctx))) for name, macro, fn in _BUILTIN]
    parts += [(name, lambda fn=fn: fn(ds)) for name, fn in _SECTIONS.items()]
    sections = []
    for name, fn in parts:
        try:
            frag = fn()
        except Exception as e:  # one broken section must not cost the whole report
            frag = _macro("failed", f"{type(e).__name__}: {e}")
        if frag:
            sid = "sec-" + "".join(ch if ch.isalnum() else "-" for ch in name.lower())
            sections.append({"id": sid, "name": name, "html": Markup(frag)})
    return _env().get_template("report.html.j2").render(root=root, generated=time.strftime("%Y-%m-%d %H:%M:%S"),
                                                        sections=sections)


def default_output(root: str) -> str:
    return storage.join(root, "report.html")


def write_report(root: str, output: str | None = None) -> str:
    """Write the HTML report of dataset ``root`` to ``output`` (default ``<root>/report.html``; local or s3://)."""
    out = output or default_output(root)
    storage.write_bytes(out, build_report(root).encode("utf-8"))
    return out
