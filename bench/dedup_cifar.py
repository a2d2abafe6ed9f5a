"""Dedup quality on CIFAR-10's train split with planted near-duplicates.

Planted: ``--planted`` random train photos get one near-duplicate each
(cycling: JPEG re-encode at quality 40, a 3-pixel crop on every side, a
resize to 24x24), added to the split. Everything goes through the product:
shards written with ShardWriter, ``run_embed`` (Ray Data actor pool) with a
**random-init** ``convnext_atto`` (no backbone of our own training was
available when this was written; say so when quoting the numbers), then
copy dedup.

Side by side in one run, the same kNN graph (k=64) + union-find at several
cosine thresholds, on:

- ours: the model's embeddings (``webcurate embed``);
- peer: raw-pixel vectors (the 32x32x3 image, mean-removed, L2-normalised),
  the usual no-model baseline for near-duplicates;
- and exact sha256 (``--method exact``), which finds none of the planted copies.

A planted pair counts as found when the copy and its original end in one
component. Precision = planted members among removed samples (CIFAR-10 has a
few natural near-duplicates of its own, which count against it). Finally
``run_dedup`` runs end to end at the best threshold for ours.

    .venv/bin/python bench/dedup_cifar.py            # 50k + 2000 planted
    .venv/bin/python bench/dedup_cifar.py --quick    # 5k + 250
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import time

import numpy as np

# OpenMP threads (faiss) spin while idle by default, which starves everything else on a
# small shared machine; the CLI sets the same. Must be set before faiss loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CIFAR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cifar10.tar.gz")
VARIANTS = ("quality", "crop", "resize")


def near_duplicate(data: bytes, kind: str) -> bytes:
    from PIL import Image

    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    if kind == "crop":
        im = im.crop((3, 3, w - 3, h - 3))
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


def pair_scores(x: np.ndarray, orig: np.ndarray, copy: np.ndarray, kinds: np.ndarray, thresholds: list[float],
                k: int) -> list[dict]:
    """Planted-pair precision / recall of kNN-graph components at each threshold."""
    from webcurate.curation.unionfind import connected_components
    from webcurate.curation.vectors import knn_edges

    n = len(x)
    src, dst, sim = knn_edges(x, k, min(thresholds), desc=None)
    planted = np.zeros(n, bool)
    planted[orig] = planted[copy] = True
    out = []
    for t in thresholds:
        m = sim > t
        labels = connected_components(n, src[m], dst[m])
        found = labels[orig] == labels[copy]
        # Removed = every component member but one.
        sizes = np.bincount(labels, minlength=n)
        in_group = sizes[labels] > 1
        removed = int(in_group.sum() - (sizes > 1).sum())
        extra = int((in_group & ~planted).sum())
        tp = int(found.sum())
        precision = tp / removed if removed else 1.0
        by_kind = {kd: float(found[kinds == kd].mean()) for kd in VARIANTS}
        out.append({"threshold": t, "recall": found.mean(), "precision": min(precision, 1.0),
                    "removed": removed, "non_planted_in_groups": extra, "tp": tp, "by_kind": by_kind})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--originals", type=int, default=None, help="train photos used (default: all 50,000)")
    ap.add_argument("--planted", type=int, default=2000, help="near-duplicates planted")
    ap.add_argument("--model", default="convnext_atto")
    ap.add_argument("--checkpoint", default=None,
                    help="embed with this `webcurate train` checkpoint/export instead of random-init weights")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="5,000 photos + 250 planted")
    ap.add_argument("--cifar", default=CIFAR)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    if args.quick:
        args.originals, args.planted = 5000, 250
    os.environ.setdefault("WEBCURATE_QUIET", "1")

    from webcurate.curation.dedup import run_dedup
    from webcurate.curation.embed import run_embed
    from webcurate.curation.vectors import read_embeddings
    from webcurate.shards.keys import make_key

    t = time.time()
    items = read_train(args.cifar, args.originals)
    n0 = len(items)
    rng = np.random.default_rng(1)
    src_idx = np.sort(rng.choice(n0, args.planted, replace=False))
    for j, i in enumerate(src_idx):
        name, data, cls = items[i]
        kind = VARIANTS[j % len(VARIANTS)]
        items.append((f"planted/{kind}/{name}", near_duplicate(data, kind), cls))
    # Shuffle so copies and originals land in different shards.
    perm = np.random.default_rng(2).permutation(len(items))
    items = [items[i] for i in perm]
    pos = {name: i for i, (name, _, _) in enumerate(items)}
    copies = sorted((n for n, _, _ in items if n.startswith("planted/")))
    copy = np.array([pos[c] for c in copies], dtype=np.int64)
    orig = np.array([pos[c.split("/", 2)[2]] for c in copies], dtype=np.int64)
    kinds = np.array([c.split("/", 2)[1] for c in copies])
    print(f"# dedup_cifar: {n0:,} CIFAR-10 train photos + {args.planted:,} planted near-duplicates "
          f"({', '.join(VARIANTS)}); read in {time.time() - t:.1f}s")

    work = args.workdir or tempfile.mkdtemp(prefix="webcurate-dedupcifar-")
    root = os.path.join(work, "cifar")
    shutil.rmtree(root, ignore_errors=True)
    t = time.time()
    write_dataset(root, items, shard_size=5000)
    print(f"write shards: {time.time() - t:.1f}s")

    t = time.time()
    emb_res = run_embed(root, args.model, random_init=args.checkpoint is None, checkpoint=args.checkpoint,
                        image_size=args.image_size, batch_size=256, summary=False)
    embed_s = time.time() - t
    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else "RANDOM-INIT weights"
    ours = f"ours: {emb_res['model']} ({'checkpoint' if args.checkpoint else 'random-init'})"
    print(f"embed ({emb_res['model']}, {weights}, {args.image_size}px): {embed_s:.1f}s, "
          f"{len(items) / embed_s:.0f} images/s, counts {emb_res['counts']}")
    emb = read_embeddings(root)
    key_pos = {k: i for i, k in enumerate(emb.keys)}
    order = np.array([key_pos[make_key(n)] for n, _, _ in items])
    x_ours = np.ascontiguousarray(emb.vectors[order])
    t = time.time()
    x_pix = pixel_vectors(items)
    print(f"raw-pixel vectors: {time.time() - t:.1f}s")

    thresholds = [0.6, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99]
    rows = []
    for name, x in ((ours, x_ours), ("peer: raw pixels", x_pix)):
        t = time.time()
        for r in pair_scores(x, orig, copy, kinds, thresholds, args.k):
            rows.append((name, r))
        print(f"{name}: kNN graph + components at {len(thresholds)} thresholds in {time.time() - t:.1f}s")

    t = time.time()
    ex = run_dedup(root, method="exact", summary=False)
    exact_s = time.time() - t

    def f1(r):
        return 2 * r["precision"] * r["recall"] / max(r["precision"] + r["recall"], 1e-9)

    best = max((r for n, r in rows if n.startswith("ours")), key=f1)
    t = time.time()
    res = run_dedup(root, method="copy", k=args.k, threshold=best["threshold"], summary=False)
    dedup_s = time.time() - t
    from webcurate.shards.dataset import Dataset

    table = Dataset(root).read_sidecar("dedup", columns=["key", "keep", "duplicate_of"])
    keep = dict(zip(table["key"].to_pylist(), table["keep"].to_pylist()))
    dup = dict(zip(table["key"].to_pylist(), table["duplicate_of"].to_pylist()))
    names = [n for n, _, _ in items]

    def keeper(i: int) -> str:
        k = make_key(names[i])
        return k if keep[k] else dup[k]

    e2e_recall = float(np.mean([keeper(o) == keeper(c) for o, c in zip(orig, copy)]))

    print()
    print("| embeddings | threshold | planted-pair recall | recall quality / crop / resize | precision | removed "
          "| non-planted samples in groups |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        bk = " / ".join(f"{r['by_kind'][kd]:.2f}" for kd in VARIANTS)
        print(f"| {name} | {r['threshold']} | {r['recall']:.3f} | {bk} | {r['precision']:.3f} | {r['removed']:,} | "
              f"{r['non_planted_in_groups']:,} |")
    print(f"| exact sha256 (`--method exact`) | - | 0.000 | - | - | {ex['counts']['removed']:,} | - |")
    print()
    print(f"run_dedup end to end (copy, k={args.k}, threshold {best['threshold']}, {res['index']} index): "
          f"{dedup_s:.1f}s, removed {res['counts']['removed']:,}, planted-pair recall {e2e_recall:.3f}; "
          f"exact method {exact_s:.1f}s; embed {embed_s:.0f}s ({len(items) / embed_s:.0f} img/s); "
          f"load average {os.getloadavg()[0]:.1f}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
