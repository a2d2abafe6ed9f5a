"""`webcurate report`: one self-contained HTML page about a dataset.

Images are inlined as base64 JPEG thumbnails and charts as inline SVG, so the
file can be mailed or opened from S3 without anything beside it. Sections
appear when their data exists:

- overview: sample counts by status, and every stage with its counts;
- cluster sizes: sorted level-1 and top-level cluster sizes before and after
  balanced sampling (log scale);
- clusters: a grid of samples per top-level cluster, largest first (sampled
  ones first, closest to their centroid first);
- duplicates: dedup groups side by side (kept sample first, then what was
  dropped with its cosine similarity);
- retrieval: seeds next to the pool samples they retrieved, with scores;
- sections other stages add with ``register_section(name, fn)`` where
  ``fn(dataset) -> str | None`` returns an HTML fragment (or None to skip).
  ``image_tags(dataset, keys)`` gives them thumbnails to embed.

To stay cheap on large datasets, images are read from at most
``MAX_SHARDS`` shards (a shard is one tar download); samples are picked
from those shards first.
"""
from __future__ import annotations

import base64
import html
import io
import time
from collections import Counter, defaultdict
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

    Sections are shown after the built-in ones, in registration order,
    under an ``<h2>`` with ``name``. An exception in ``fn`` is shown in its
    section instead of failing the whole report.
    """
    _SECTIONS[name] = fn


def registered_sections() -> dict[str, SectionFn]:
    return dict(_SECTIONS)


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
        shards = sorted(set(self.shard_of.values()))
        self.allowed = set(shards[:max_shards])
        self.thumbs: dict[str, str | None] = {}

    def readable(self, key: str) -> bool:
        return self.shard_of.get(key) in self.allowed

    def load(self, keys: Iterable[str]) -> dict[str, str | None]:
        """Thumbnails (data: URIs, None when not loadable) of ``keys``.

        Sections ask for all their keys in one call, so each shard is read
        once per section at most; keys already loaded are not read again.
        """
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


def image_tags(ds: Dataset, keys: list[str], captions: dict[str, str] | None = None,
               cache: ImageCache | None = None) -> str:
    """HTML ``<figure>``s with inline thumbnails of ``keys`` (a placeholder when not loadable)."""
    cache = cache or ImageCache(ds)
    thumbs = cache.load(keys)
    return "".join(_figure(thumbs.get(k), k, (captions or {}).get(k)) for k in keys)


def _render_groups(ds: Dataset, groups: list[tuple[str, list[str], dict[str, str]]], cache: ImageCache) -> str:
    """Titled image grids; all their images are loaded in one pass over the shards."""
    cache.load(k for _, keys, _ in groups for k in keys)
    return "".join(f'<div class="group"><h4>{html.escape(title)}</h4>'
                   f'<div class="grid">{image_tags(ds, keys, caps, cache)}</div></div>'
                   for title, keys, caps in groups)


def _figure(uri: str | None, key: str, caption: str | None = None, cls: str = "") -> str:
    img = (f'<img src="{uri}" alt="{html.escape(key)}">' if uri
           else '<div class="noimg">not loaded</div>')
    cap = html.escape(caption) if caption else html.escape(key)
    return f'<figure class="{cls}" title="{html.escape(key)}">{img}<figcaption>{cap}</figcaption></figure>'


# -- charts --------------------------------------------------------------------

def size_chart_svg(series: dict[str, np.ndarray], title: str, width: int = 720, height: int = 180) -> str:
    """Inline SVG bars of cluster sizes sorted by the first series (log scale).

    series: name -> (K,) sizes of the same K clusters; more than MAX_BARS
    clusters are averaged into MAX_BARS rank buckets.
    """
    names = list(series)
    base = np.asarray(series[names[0]], dtype=np.float64)
    order = np.argsort(-base, kind="stable")
    k = len(order)
    bars = min(k, MAX_BARS)
    edges = np.linspace(0, k, bars + 1).astype(int)
    colours = ["#9aa5b1", "#2f6fde", "#d9822b"]
    top = max(float(np.asarray(v).max()) if len(v) else 1.0 for v in series.values())
    scale = np.log1p(max(top, 1.0))
    bw = (width - 50) / max(bars, 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" role="img">',
             f'<text x="4" y="14" font-size="12">{html.escape(title)}</text>',
             f'<text x="4" y="{26}" font-size="10" fill="#555">max {int(top)}</text>',
             f'<line x1="45" y1="{height + 20}" x2="{width}" y2="{height + 20}" stroke="#333"/>']
    for si, name in enumerate(names):
        vals = np.asarray(series[name], dtype=np.float64)[order]
        for b in range(bars):
            v = vals[edges[b]:max(edges[b + 1], edges[b] + 1)].mean()
            h = (np.log1p(v) / scale) * (height - 10) if v > 0 else 0
            x = 45 + b * bw + (si * bw * 0.25 if len(names) > 1 else 0)
            w = max(bw * (0.7 if len(names) > 1 else 0.9), 0.5)
            parts.append(f'<rect x="{x:.1f}" y="{height + 20 - h:.1f}" width="{w:.1f}" height="{h:.1f}" '
                         f'fill="{colours[si % 3]}" fill-opacity="{0.9 if si else 0.6}"/>')
    for si, name in enumerate(names):
        parts.append(f'<rect x="{60 + si * 150}" y="{height + 28}" width="10" height="10" fill="{colours[si % 3]}"/>'
                     f'<text x="{74 + si * 150}" y="{height + 37}" font-size="11">{html.escape(name)}</text>')
    parts.append(f'<text x="{width - 190}" y="14" font-size="10" fill="#555">{k} clusters, largest first</text>')
    parts.append("</svg>")
    return "".join(parts)


# -- sections ------------------------------------------------------------------

def _table(rows: list[tuple[Any, ...]], headers: tuple[str, ...]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _overview(ds: Dataset) -> str:
    m = ds.manifest
    idx = ds.index(columns=["status"])
    by_status = Counter(idx["status"].to_pylist())
    rows = [("samples", idx.num_rows)] + [(f"status {k}", v) for k, v in sorted(by_status.items())]
    rows += [("shards complete", f"{len(ds.completed_shards())} / {ds.num_shards}"),
             ("made by", f"{m.get('stage')} (parent: {m.get('parent') or '-'})")]
    out = _table(rows, ("what", "count"))
    stages = m.get("stages", {})
    if stages:
        srows = []
        for name, e in sorted(stages.items()):
            counts = ", ".join(f"{k} {v}" for k, v in (e.get("counts") or {}).items())
            srows.append((name, len(e.get("completed_shards", [])), counts, e.get("finished") or "not finished"))
        out += "<h3>Stages</h3>" + _table(srows, ("stage", "parts", "counts", "finished"))
    return out


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


def _cluster_sizes(ds: Dataset, ctx: dict) -> str | None:
    data = ctx.get("clusters")
    if data is None:
        return None
    t, lvl, sel = data
    out = []
    for col in ([lvl[0], lvl[-1]] if len(lvl) > 1 else lvl):
        ids = t[col].to_numpy(zero_copy_only=False)
        k = int(ids.max()) + 1 if len(ids) else 0
        before = np.bincount(ids, minlength=k)
        present = before > 0
        series = {"all clustered": before[present]}
        if sel is not None:
            series["after balanced sampling"] = np.bincount(ids[sel], minlength=k)[present]
        out.append(size_chart_svg(series, f"{col}: samples per cluster"))
        rows = [("clusters (non-empty)", int(present.sum())), ("largest", int(before.max())),
                ("median", float(np.median(before[present]))), ("smallest", int(before[present].min()))]
        if sel is not None:
            after = np.bincount(ids[sel], minlength=k)[present]
            rows += [("after sampling: largest", int(after.max())), ("after sampling: median", float(np.median(after))),
                     ("after sampling: clusters represented", int((after > 0).sum()))]
        out.append(_table(rows, (col, "value")))
    return "".join(out)


def _cluster_grid(ds: Dataset, ctx: dict, max_clusters: int = 12, per_cluster: int = 8) -> str | None:
    data = ctx.get("clusters")
    if data is None:
        return None
    t, lvl, sel = data
    cache: ImageCache = ctx["images"]
    top = lvl[-1]
    ids = t[top].to_numpy(zero_copy_only=False)
    keys = t["key"].to_pylist()
    dist = t["distance"].to_numpy(zero_copy_only=False)
    sizes = np.bincount(ids)
    groups = []
    for c in np.argsort(-sizes, kind="stable")[:max_clusters]:
        if sizes[c] == 0:
            continue
        members = np.flatnonzero(ids == c)
        readable = np.fromiter((cache.readable(keys[i]) for i in members), dtype=bool, count=len(members))
        chosen = sel[members] if sel is not None else np.zeros(len(members), bool)
        order = np.lexsort((dist[members], ~chosen, ~readable))[:per_cluster]
        pick = [keys[members[i]] for i in order]
        caps = {keys[members[i]]: f"{'✓ ' if chosen[i] else ''}d={dist[members[i]]:.2f}" for i in order}
        n_sel = f", {int(chosen.sum())} sampled" if sel is not None else ""
        groups.append((f"{top} = {int(c)}: {int(sizes[c])} samples{n_sel}", pick, caps))
    note = "<p>✓ = kept by balanced sampling; d = distance to the level-1 centroid.</p>" if sel is not None else ""
    return note + _render_groups(ds, groups, cache)


def _duplicates(ds: Dataset, ctx: dict, max_groups: int = 10, per_group: int = 6) -> str | None:
    if not ds.sidecar_completed("dedup"):
        return None
    t = ds.read_sidecar("dedup")
    keys = t["key"].to_pylist()
    keep = t["keep"].to_pylist()
    dup_of = t["duplicate_of"].to_pylist() if "duplicate_of" in t.column_names else [None] * len(keys)
    sim = t["similarity"].to_pylist() if "similarity" in t.column_names else [None] * len(keys)
    reason = t["reason"].to_pylist() if "reason" in t.column_names else [None] * len(keys)
    local = set(keys)
    groups: dict[str, list[int]] = defaultdict(list)
    external = Counter()
    for i, (k, kp, d) in enumerate(zip(keys, keep, dup_of)):
        if kp or d is None:
            continue
        if d in local:
            groups[d].append(i)
        else:
            external[reason[i] or "other"] += 1
    cache: ImageCache = ctx["images"]
    removed = sum(1 for kp in keep if not kp)
    head = f"<p>{removed} of {len(keys)} samples removed; {len(groups)} groups of duplicates within the dataset"
    if external:
        head += "; removed for matching another dataset: " + ", ".join(f"{r} {n}" for r, n in external.items())
    head += ".</p>"
    ranked = sorted(groups.items(), key=lambda kv: (not cache.readable(kv[0]), -len(kv[1]), kv[0]))
    shown = []
    for kept, members in ranked[:max_groups]:
        members = sorted(members, key=lambda i: -(sim[i] or 0))[:per_group - 1]
        pick = [kept] + [keys[i] for i in members]
        caps = {kept: "kept"}
        caps.update({keys[i]: f"{reason[i] or 'dup'} {sim[i]:.3f}" if sim[i] is not None else (reason[i] or "dup")
                     for i in members})
        shown.append((f"{len(groups[kept]) + 1} copies", pick, caps))
    return head + _render_groups(ds, shown, cache)


def _retrieval(ds: Dataset, ctx: dict, max_seeds: int = 10, per_seed: int = 6) -> str | None:
    if not ds.sidecar_completed("retrieve"):
        return None
    t = ds.read_sidecar("retrieve")
    rows = t.filter(pc.fill_null(t["selected"], False)).to_pylist()
    head = f"<p>{len(rows)} of {t.num_rows} pool samples retrieved.</p>"
    by_seed: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        by_seed[(r.get("seed_dataset") or "", r.get("seed_key") or "")].append(r)
    cache: ImageCache = ctx["images"]
    top_seeds = [(sk, sorted(hits, key=lambda r: -(r.get("score") or 0))[:per_seed], len(hits))
                 for sk, hits in sorted(by_seed.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:max_seeds]]
    # One pass over the pool's shards for every hit shown, one per seed dataset for the seeds.
    cache.load(r["key"] for _, hits, _ in top_seeds for r in hits)
    seed_thumbs: dict[tuple[str, str], str | None] = {}
    for seed_ds in sorted({sd for (sd, _), _, _ in top_seeds}):
        wanted = [sk for (sd, sk), _, _ in top_seeds if sd == seed_ds]
        try:
            got = ImageCache(Dataset(seed_ds)).load(wanted) if seed_ds else {}
        except Exception:  # the seed dataset may be gone or unreadable; show the hits anyway
            got = {}
        seed_thumbs.update({(seed_ds, k): got.get(k) for k in wanted})
    parts = []
    for (seed_ds, seed_key), hits, n_hits in top_seeds:
        seed_fig = _figure(seed_thumbs.get((seed_ds, seed_key)), seed_key, f"seed {seed_key}", "seed")
        caps = {r["key"]: f"{r.get('score') or 0:.3f}" for r in hits}
        parts.append(f'<div class="group"><h4>seed {html.escape(seed_key)} from {html.escape(seed_ds)}: '
                     f'{n_hits} hits</h4><div class="grid">{seed_fig}'
                     f'{image_tags(ds, [r["key"] for r in hits], caps, cache)}</div></div>')
    return head + "".join(parts)


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{margin-top:32px;border-bottom:1px solid #ddd}h4{margin:12px 0 4px;font-size:13px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;font-size:13px;text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;width:100px;text-align:center}
figure img{width:96px;height:96px;object-fit:cover;border-radius:3px}figure.seed img{outline:3px solid #d9822b}
figcaption{font-size:10px;color:#555;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.noimg{width:96px;height:96px;background:#eee;font-size:10px;line-height:96px;color:#888}
.error{color:#b00}
"""


def build_report(root: str, *, max_shards: int = MAX_SHARDS) -> str:
    """The report of dataset ``root`` as an HTML string."""
    import webcurate.curation.labeling.report_section  # noqa: F401  (registers the labelling sections)
    import webcurate.curation.quality_report  # noqa: F401  (registers the quality-filter section)

    ds = Dataset(root)
    _ = ds.manifest  # clear error when it is not a dataset
    ctx: dict[str, Any] = {"images": ImageCache(ds, max_shards=max_shards)}
    ctx["clusters"] = _clusters_table(ds)
    builtin: list[tuple[str, Callable[[], str | None]]] = [
        ("Overview", lambda: _overview(ds)),
        ("Cluster sizes", lambda: _cluster_sizes(ds, ctx)),
        ("Clusters", lambda: _cluster_grid(ds, ctx)),
        ("Duplicates", lambda: _duplicates(ds, ctx)),
        ("Retrieval", lambda: _retrieval(ds, ctx)),
    ]
    builtin += [(name, (lambda f=fn: f(ds))) for name, fn in _SECTIONS.items()]
    body = []
    for name, fn in builtin:
        try:
            frag = fn()
        except Exception as e:  # one broken section must not cost the whole report
            frag = f'<p class="error">this section failed: {html.escape(type(e).__name__)}: {html.escape(str(e))}</p>'
        if frag:
            sid = "sec-" + "".join(ch if ch.isalnum() else "-" for ch in name.lower())
            body.append(f'<section id="{sid}"><h2>{html.escape(name)}</h2>{frag}</section>')
    title = f"webcurate report: {html.escape(root)}"
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title><style>{_CSS}</style>'
            f'</head><body><h1>{title}</h1><p>generated {time.strftime("%Y-%m-%d %H:%M:%S")}</p>'
            + "".join(body) + "</body></html>")


def default_output(root: str) -> str:
    return storage.join(root, "report.html")


def write_report(root: str, output: str | None = None) -> str:
    """Write the HTML report of dataset ``root`` to ``output`` (default ``<root>/report.html``).

    ``output`` may be a local path or an s3:// URI; returns where it was written.
    """
    out = output or default_output(root)
    storage.write_bytes(out, build_report(root).encode("utf-8"))
    return out
