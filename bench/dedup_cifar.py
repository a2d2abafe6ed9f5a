"""Dedup quality on CIFAR-10's train split with planted near-duplicates.

Planted: ``--planted`` random train photos get one near-duplicate each
(cycling: JPEG re-encode at quality 40, a crop, a resize to 24x24; the crop
is ``--crop centre`` by default: a seeded random share of 0.75-0.95 of each side
around the centre; ``random`` puts it anywhere, ``fixed`` is the 3-pixel crop on
every side of the first runs), added to the split. Everything goes through the product:
shards written with ShardWriter, ``run_embed`` (Ray Data actor pool; a
``webcurate train`` backbone with ``--checkpoint``, else a **random-init**
``convnext_atto`` -- say which when quoting the numbers), then copy dedup.

Side by side in one run, the product's kNN graph (``knn_edges_array``, k=64)
+ connected components (``components``) at several cosine thresholds, on:

- ours: the model's embeddings (``webcurate embed``);
- peer: raw-pixel vectors (the 32x32x3 image, mean-removed, L2-normalised),
  the usual no-model baseline for near-duplicates and the pixel-level
  ("perceptual") signal the product has no stage for;
- and exact sha256 (``--method exact``), which finds none of the planted copies.

Combinations (issue 13: "pixel-level hashes (exact + perceptual) with
embeddings"): the product's dedup runs exact sha256 first, then the
embedding graph (``--method copy``); it has no perceptual-hash step. What one
would add is measured on the union of the two kNN graphs' edges, each edge
with both cosines: pixels OR embeddings, pixels AND embeddings, and the mean
of the two cosines (= the cosine of the concatenated, block-normalised
vectors, which ``dedup --method copy`` would run as is). These rows are the
product's graph + components on candidate edges, not a product stage.

Then the product's pixel views (``dedup --pixel-threshold``, curation/pixel_views.py: 16x16
thumbnails of the image and of centre crops zoomed along its ladder, any view against any
view): the product's distributed pixel graph (``dedup_graph.knn_graph`` on the ``pixels``
sidecar) scored at several thresholds, then ``run_dedup`` end to end at ``--pixel-threshold``:
alone (an embedding threshold nothing passes) and joined with the embedding graph at the
calibrated embedding threshold. ``--audit N`` draws N of the removals the planted truth
calls false into a numbered grid (bench/_dedup_pixel_views.py); ``--audit-labels FILE`` (a person's
same/different marks of those pairs) turns them into an audited precision estimate.

A planted pair counts as found when the copy and its original end in one
component. Precision = planted members among removed samples (CIFAR-10 has a
few natural near-duplicates of its own, which count against it). Finally
``run_dedup`` runs end to end twice: at the threshold ``embed`` calibrated
(``--threshold auto``, what a user gets) and at the best threshold for ours.

    .venv/bin/python bench/dedup_cifar.py            # 50k + 2000 planted
    .venv/bin/python bench/dedup_cifar.py --quick    # 5k + 250
    .venv/bin/python bench/dedup_cifar.py --checkpoint RUN/backbone.safetensors
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass

import numpy as np

# OpenMP threads (faiss) spin while idle by default, which starves everything else on a
# small shared machine; the CLI sets the same. Must be set before faiss loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CIFAR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cifar10.tar.gz")
VARIANTS = ("quality", "crop", "resize")


def near_duplicate(data: bytes, kind: str, rng: np.random.Generator | None = None, crop: str = "fixed") -> bytes:
    from PIL import Image

    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    if kind == "crop" and crop == "fixed":
        im = im.crop((3, 3, w - 3, h - 3))
    elif kind == "crop":
        share = rng.uniform(*CROP_SHARE)
        cw, ch = round(w * share), round(h * share)
        x, y = ((w - cw) // 2, (h - ch) // 2) if crop == "centre" else (rng.integers(0, w - cw + 1),
                                                                        rng.integers(0, h - ch + 1))
        im = im.crop((x, y, x + cw, y + ch))
    elif kind == "resize":
        im = im.resize((24, 24), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=40 if kind == "quality" else 90)
    return buf.getvalue()


def read_train(path: str, limit: int | None) -> list[tuple[str, bytes, str]]:
    """(name, jpeg bytes, class) of the train split in tar order, at most ``limit``."""
    out = []
    with tarfile.open(path, "r:gz") as tar:
        for m in tar:
            if not (m.isfile() and m.name.startswith("train/") and m.name.endswith(".jpg")):
                continue
            cls = m.name.split("/")[1]
            out.append((m.name, tar.extractfile(m).read(), cls))
    out.sort()
    if limit and limit < len(out):
        rng = np.random.default_rng(0)
        out = [out[i] for i in np.sort(rng.choice(len(out), limit, replace=False))]
    return out


def write_dataset(root: str, items: list[tuple[str, bytes, str]], shard_size: int) -> None:
    from PIL import Image

    from webcurate.shards import manifest as manifest_mod
    from webcurate.shards.keys import make_key
    from webcurate.shards.writer import ShardWriter

    n_shards = -(-len(items) // shard_size)
    manifest_mod.save(root, manifest_mod.new("bench", {"n": len(items)}, parent=None, num_shards=n_shards))
    for s in range(n_shards):
        w = ShardWriter(root, s)
        for name, data, cls in items[s * shard_size:(s + 1) * shard_size]:
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
            w.add(make_key(name), data, "jpg", {"source": name, "label": cls, "width": width, "height": height,
                                                 "sha256": hashlib.sha256(data).hexdigest()})
        manifest_mod.record_shard(root, s, w.commit())


def pixel_vectors(items: list[tuple[str, bytes, str]]) -> np.ndarray:
    """Raw-pixel baseline: each image at 32x32 RGB, mean-removed, L2-normalised (N, 3072)."""
    from PIL import Image

    x = np.empty((len(items), 32 * 32 * 3), dtype=np.float32)
    for i, (_, data, _) in enumerate(items):
        im = Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.BICUBIC)
        v = np.asarray(im, dtype=np.float32).reshape(-1)
        x[i] = v - v.mean()
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
    return x


THRESHOLDS = [0.6, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99]
# Combinations only look at edges above this on one side (below it no rule here can pass).
COMBO_FLOOR = 0.8
PIXEL_AND = [0.6, 0.7, 0.8, 0.85, 0.9, 0.95]
MEAN_T = [0.85, 0.9, 0.92, 0.94, 0.96, 0.98]
TARGET_PRECISION, TARGET_RECALL = 0.9, 0.8
# Pixel views (curation/pixel_views.py): the graph scored at these; NONE_T: an embedding threshold nothing passes.
PIXEL_VIEW_T = [0.94, 0.95, 0.96, 0.97, 0.98]
CROP_SHARE = (0.75, 0.95)  # --crop centre / random: share of each side the crop keeps
NONE_T = 0.99999


@dataclass
class Truth:
    """Positions of the planted copies, their originals and kinds, and which samples are planted."""

    orig: np.ndarray
    copy: np.ndarray
    kinds: np.ndarray
    planted: np.ndarray


def score(n: int, src: np.ndarray, dst: np.ndarray, keep: np.ndarray, truth: Truth) -> dict:
    """Planted-pair recall / precision of the connected components of the edges ``keep``."""
    from webcurate.curation.components import components

    _, labels = components(src[keep], dst[keep], extra_nodes=np.arange(n))  # nodes = 0..n-1
    found = labels[truth.orig] == labels[truth.copy]
    sizes = np.bincount(labels, minlength=n)
    in_group = sizes[labels] > 1
    removed = int(in_group.sum() - (sizes > 1).sum())  # every component member but one
    tp = int(found.sum())
    return {"recall": float(found.mean()), "precision": min(tp / removed, 1.0) if removed else 1.0,
            "removed": removed, "non_planted_in_groups": int((in_group & ~truth.planted).sum()), "tp": tp,
            "by_kind": {kd: float(found[truth.kinds == kd].mean()) for kd in VARIANTS}}


def f1(r: dict) -> float:
    return 2 * r["precision"] * r["recall"] / max(r["precision"] + r["recall"], 1e-9)


def best_row(rows: list[dict]) -> dict:
    """The most precise row at recall >= the target, else the best F1."""
    ok = [r for r in rows if r["recall"] >= TARGET_RECALL]
    return max(ok, key=lambda r: (r["precision"], r["recall"])) if ok else max(rows, key=f1)


def edge_cosines(x: np.ndarray, src: np.ndarray, dst: np.ndarray, chunk: int = 32768) -> np.ndarray:
    """Cosine of each edge's two (normalised) vectors."""
    out = np.empty(len(src), np.float32)
    for i in range(0, len(src), chunk):
        out[i:i + chunk] = np.einsum("ij,ij->i", x[src[i:i + chunk]], x[dst[i:i + chunk]])
    return out


def combinations(n: int, g_emb: tuple, g_pix: tuple, x_emb: np.ndarray, x_pix: np.ndarray, truth: Truth) -> list[dict]:
    """Pixels OR / AND embeddings and the mean cosine, on the union of both graphs' edges above COMBO_FLOOR."""
    codes = [s[c > COMBO_FLOOR] * n + d[c > COMBO_FLOOR] for s, d, c in (g_emb, g_pix)]
    code = np.unique(np.concatenate(codes))
    src, dst = code // n, code % n
    ce, cp = edge_cosines(x_emb, src, dst), edge_cosines(x_pix, src, dst)
    rules = [("pixels OR embeddings", a, b, (cp > a) | (ce > b)) for a in (0.95, 0.97, 0.98) for b in THRESHOLDS[1:]]
    rules += [("pixels AND embeddings", a, b, (cp > a) & (ce > b)) for a in PIXEL_AND for b in THRESHOLDS[1:]]
    rules += [("mean of both cosines", t, t, (cp + ce) / 2 > t) for t in MEAN_T]
    out = []
    for rule, a, b, keep in rules:
        out.append({"rule": rule, "pixel_threshold": a, "emb_threshold": b, **score(n, src, dst, keep, truth)})
    return out


def pareto(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both precision and recall, by recall."""
    keep = [r for r in rows if not any(o["precision"] >= r["precision"] and o["recall"] >= r["recall"]
                                       and (o["precision"], o["recall"]) != (r["precision"], r["recall"]) for o in rows)]
    seen, out = set(), []
    for r in keep:  # one row per (precision, recall): the first (loosest) thresholds that give it
        if (r["precision"], r["recall"]) not in seen:
            seen.add((r["precision"], r["recall"]))
            out.append(r)
    return sorted(out, key=lambda r: r["recall"])


def end_to_end(root: str, names: list[str], truth: Truth, threshold, k: int, pixel_threshold=None,
               keepers: dict | None = None) -> dict:
    """``run_dedup`` (copy) at ``threshold`` (and ``pixel_threshold``) through the product; planted-pair recall and
    precision from its sidecar. ``keepers`` gets removed item -> kept item."""
    from webcurate.curation.dedup import MassRemovalError, run_dedup
    from webcurate.shards.dataset import Dataset
    from webcurate.shards.keys import make_key

    t = time.time()
    try:
        res = run_dedup(root, method="copy", k=k, threshold=threshold, pixel_threshold=pixel_threshold,
                        summary=False)
    except MassRemovalError as e:
        return {"refused": str(e).splitlines()[0], "seconds": time.time() - t}
    secs = time.time() - t
    table = Dataset(root).read_sidecar("dedup", columns=["key", "keep", "duplicate_of"])
    keep = dict(zip(table["key"].to_pylist(), table["keep"].to_pylist()))
    dup = dict(zip(table["key"].to_pylist(), table["duplicate_of"].to_pylist()))

    def keeper(i: int) -> str:
        key = make_key(names[i])
        return key if keep[key] else dup[key]

    found = np.array([keeper(o) == keeper(c) for o, c in zip(truth.orig, truth.copy)])
    removed = int(res.totals.get("removed", 0))
    if keepers is not None:
        pos = {make_key(nm): i for i, nm in enumerate(names)}
        keepers.update({pos[k]: pos[dup[k]] for k, kept in keep.items() if not kept and dup.get(k) in pos})
    return {"threshold": res.info.get("threshold"), "source": res.info.get("threshold_source"),
            "pixel_threshold": pixel_threshold, "pixel_only_edges": res.info.get("pixel_only_edges"),
            "index": res.info.get("index"), "removed": removed, "recall": float(found.mean()),
            "precision": min(int(found.sum()) / removed, 1.0) if removed else 1.0, "tp": int(found.sum()),
            "by_kind": {kd: float(found[truth.kinds == kd].mean()) for kd in VARIANTS}, "seconds": secs}


def plant(items: list, planted: int, crop: str = "fixed") -> tuple[list, Truth]:
    """Append one near-duplicate of ``planted`` random photos, shuffle; the items and where the pairs are."""
    n0 = len(items)
    rng = np.random.default_rng(1)
    crop_rng = np.random.default_rng(3)
    for j, i in enumerate(np.sort(rng.choice(n0, planted, replace=False))):
        name, data, cls = items[i]
        kind = VARIANTS[j % len(VARIANTS)]
        items.append((f"planted/{kind}/{name}", near_duplicate(data, kind, crop_rng, crop), cls))
    # Shuffle so copies and originals land in different shards.
    perm = np.random.default_rng(2).permutation(len(items))
    items = [items[i] for i in perm]
    pos = {name: i for i, (name, _, _) in enumerate(items)}
    copies = sorted(n for n, _, _ in items if n.startswith("planted/"))
    is_planted = np.zeros(len(items), bool)
    copy = np.array([pos[c] for c in copies], dtype=np.int64)
    orig = np.array([pos[c.split("/", 2)[2]] for c in copies], dtype=np.int64)
    is_planted[copy] = is_planted[orig] = True
    return items, Truth(orig, copy, np.array([c.split("/", 2)[1] for c in copies]), is_planted)


def fmt(r: dict) -> str:
    bk = " / ".join(f"{r['by_kind'][kd]:.2f}" for kd in VARIANTS)
    return f"{r['recall']:.3f} | {bk} | {r['precision']:.3f} | {r['removed']:,}"


def embed_pool(root: str, items: list, args) -> tuple[np.ndarray, str, dict]:
    """The pool's embeddings in ``items`` order through ``run_embed``; (vectors, label, embed stage record)."""
    from webcurate.curation.embed import manifest_info, run_embed
    from webcurate.curation.embedding_parts import read_embeddings
    from webcurate.shards.keys import make_key

    t = time.time()
    res = run_embed(root, args.model, random_init=args.checkpoint is None, checkpoint=args.checkpoint,
                    image_size=args.image_size, batch_size=256, summary=False)
    secs = time.time() - t
    info = manifest_info(root)
    label = f"ours: {res.info.get('model')} ({'checkpoint' if args.checkpoint else 'random-init'})"
    print(f"embed ({res.info.get('model')}, {args.checkpoint or 'RANDOM-INIT weights'}, "
          f"{res.info.get('image_size')}px, {res.info.get('dim')}-d): {secs:.1f}s, {len(items) / secs:.0f} images/s, "
          f"totals {res.totals}")
    print(f"embedding health: {info.get('health')}")
    print(f"copy-threshold calibration (embed): {info.get('calibration')}")
    emb = read_embeddings(root)
    key_pos = {k: i for i, k in enumerate(emb.keys)}
    order = np.array([key_pos[make_key(n)] for n, _, _ in items])
    return np.ascontiguousarray(emb.vectors[order]), label, {"seconds": secs, **info}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--originals", type=int, default=None, help="train photos used (default: all 50,000)")
    ap.add_argument("--planted", type=int, default=2000, help="near-duplicates planted")
    ap.add_argument("--model", default="convnext_atto", help="timm architecture of the random-init run")
    ap.add_argument("--checkpoint", default=None,
                    help="embed with this `webcurate train` checkpoint/export instead of random-init weights")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="5,000 photos + 250 planted")
    ap.add_argument("--cifar", default=CIFAR)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write every row to this JSON file")
    ap.add_argument("--crop", choices=("centre", "random", "fixed"), default="centre",
                    help="planted crops: random share of the side around the centre, anywhere, or 3 px a side")
    ap.add_argument("--pixel-threshold", type=float, default=0.96, help="run_dedup end to end with pixel views")
    ap.add_argument("--audit", type=int, default=0, metavar="N",
                    help="draw N removals the planted truth calls false (pixel views end to end) into a grid")
    ap.add_argument("--audit-grid", default=None, help="PNG of the audit sample [default: WORKDIR/audit.png]")
    ap.add_argument("--audit-labels", default=None, help="JSON of same/different marks for the audited pairs")
    ap.add_argument("--pixels-only", action="store_true",
                    help="skip the embedding-threshold, raw-pixel and combination rows (embed still runs: "
                         "run_dedup's copy method reads the embeddings)")
    args = ap.parse_args()
    if args.quick:
        args.originals, args.planted = 5000, 250
    os.environ.setdefault("WEBCURATE_QUIET", "1")

    t = time.time()
    items, truth = plant(read_train(args.cifar, args.originals), args.planted, args.crop)
    n = len(items)
    print(f"# dedup_cifar: {n - args.planted:,} CIFAR-10 train photos + {args.planted:,} planted near-duplicates "
          f"({', '.join(VARIANTS)}; crop: {args.crop}); read in {time.time() - t:.1f}s; "
          f"load {os.getloadavg()[0]:.1f}")
    work = args.workdir or tempfile.mkdtemp(prefix="webcurate-dedupcifar-")
    root = os.path.join(work, "cifar")
    shutil.rmtree(root, ignore_errors=True)
    t = time.time()
    write_dataset(root, items, shard_size=5000)
    print(f"write shards: {time.time() - t:.1f}s")
    x_ours, ours, emb_info = embed_pool(root, items, args)
    out = {"n": n, "planted": args.planted, "crop": args.crop, "embeddings": ours, "checkpoint": args.checkpoint,
           "health": emb_info.get("health"), "calibration": emb_info.get("calibration")}
    if not args.pixels_only:
        embedding_section(root, items, truth, x_ours, ours, args, out)
    from _dedup_pixel_views import pixel_section

    pixel_section(root, items, truth, args, out, work)
    print(f"embed {emb_info['seconds']:.0f}s ({n / emb_info['seconds']:.0f} img/s); load average "
          f"{os.getloadavg()[0]:.1f}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def embedding_section(root: str, items: list, truth: Truth, x_ours: np.ndarray, ours: str, args, out: dict) -> None:
    """Embedding and raw-pixel thresholds, their combinations, exact sha256 and run_dedup at auto / best."""
    from webcurate.curation.dedup import run_dedup
    from webcurate.curation.knn import knn_edges_array

    n = len(items)
    t = time.time()
    x_pix = pixel_vectors(items)
    print(f"raw-pixel vectors: {time.time() - t:.1f}s")
    rows, graphs = [], {}
    for name, x in ((ours, x_ours), ("peer: raw pixels", x_pix)):
        t = time.time()
        graphs[name] = src, dst, sim = knn_edges_array(x, args.k, min(THRESHOLDS))
        for th in THRESHOLDS:
            rows.append({"embeddings": name, "threshold": th, **score(n, src, dst, sim > th, truth)})
        print(f"{name}: kNN graph ({len(src):,} edges > {min(THRESHOLDS)}) + components at {len(THRESHOLDS)} "
              f"thresholds in {time.time() - t:.1f}s")
    print("\n| embeddings | threshold | planted-pair recall | recall quality / crop / resize | precision | removed "
          "| non-planted samples in groups |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['embeddings']} | {r['threshold']} | {fmt(r)} | {r['non_planted_in_groups']:,} |")
    save(args.json, out, rows=rows)

    t = time.time()
    combos = combinations(n, graphs[ours], graphs["peer: raw pixels"], x_ours, x_pix, truth)
    print(f"\ncombinations: {len(combos)} rules in {time.time() - t:.1f}s; Pareto front per rule "
          "(pixel / embedding cosine thresholds):")
    print("| rule | pixel | embedding | planted-pair recall | recall quality / crop / resize | precision | removed |")
    print("|---|---|---|---|---|---|---|")
    for rule in dict.fromkeys(c["rule"] for c in combos):
        for r in pareto([c for c in combos if c["rule"] == rule]):
            print(f"| {rule} | {r['pixel_threshold']} | {r['emb_threshold']} | {fmt(r)} |")
    print()
    for label, cand in ((ours, [r for r in rows if r["embeddings"] == ours]),
                        ("raw pixels", [r for r in rows if r["embeddings"] != ours]), ("combinations", combos)):
        b = best_row(cand)
        met = b["precision"] >= TARGET_PRECISION and b["recall"] >= TARGET_RECALL
        what = b.get("rule", f"threshold {b.get('threshold')}")
        extra = f" (pixel {b['pixel_threshold']}, embedding {b['emb_threshold']})" if "rule" in b else ""
        print(f"target precision >= {TARGET_PRECISION} at recall >= {TARGET_RECALL}, {label}: best {what}{extra}: "
              f"precision {b['precision']:.3f}, recall {b['recall']:.3f} -> {'met' if met else 'NOT met'}")
    save(args.json, out, combinations=combos)

    t = time.time()
    ex = run_dedup(root, method="exact", summary=False)
    exact = {"removed": int(ex.totals.get("removed", 0)), "seconds": time.time() - t}
    print(f"| exact sha256 (`--method exact`) | - | 0.000 | - | - | {exact['removed']:,} | - | ({exact['seconds']:.1f}s)")
    best = best_row([r for r in rows if r["embeddings"] == ours])
    e2e = {}
    for label, th in (("auto", "auto"), ("best", best["threshold"])):
        e2e[label] = r = end_to_end(root, [nm for nm, _, _ in items], truth, th, args.k)
        if "refused" in r:
            print(f"run_dedup end to end (copy, threshold {label}): refused by the mass-removal guard: {r['refused']}")
        else:
            print(f"run_dedup end to end (copy, k={args.k}, threshold {r['threshold']} ({r['source']}), {r['index']} "
                  f"index): {r['seconds']:.1f}s, removed {r['removed']:,}, planted-pair recall {r['recall']:.3f} "
                  f"(quality / crop / resize {' / '.join(format(r['by_kind'][kd], '.2f') for kd in VARIANTS)}), "
                  f"precision {r['precision']:.3f}")
        save(args.json, out, exact=exact, end_to_end=e2e)


def save(path: str | None, out: dict, **more) -> None:
    """Add ``more`` to the results and rewrite the JSON file (each phase, so a killed run keeps what it did)."""
    out.update(more)
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
