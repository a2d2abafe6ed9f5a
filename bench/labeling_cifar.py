"""Real weak-labelling benchmark: CIFAR-10 train, LFs from embeddings, 10 seeds per class.

Everything runs through the product: ``ingest_folder`` (shards), ``run_embed``
(a timm ResNet-18 with *random-init* weights at 32 px: no trained backbone is
available to this benchmark), ``run_cluster`` (2-level k-means), the LF file
below applied with ``apply_lfs`` on Ray, then the label models. Random-init
features are close to chance on CIFAR, so three cheap hand-made views are
added as extra sidecars (8x8 RGB thumbnails, gradient-orientation histograms,
HSV colour histograms) and the LFs see four views of each image.

Seed: 10 labelled images per class from CIFAR-10 *test* (disjoint from the
images being labelled), embedded the same way. LFs (all from the factories):
kNN vote (k=10, margin 0.3) and prototype similarity (margin 0.02) in each
of the four spaces, and a cluster vote at each k-means level (ResNet space). They are strongly
correlated (same embeddings) — the case the dependency links are for.

Ground truth comes from the file path (train/<class>/...), never shown to
the LFs (the dataset is ingested without labels).

    .venv/bin/python bench/labeling_cifar.py           # all 50,000 train images
    .venv/bin/python bench/labeling_cifar.py --quick   # 10,000 (1,000 per class)
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("WEBCURATE_QUIET", "1")

from _snorkel import run_snorkel  # noqa: E402

DATA = os.path.join(HERE, "..", "..", "shared", "data", "cifar10.tar.gz")
WORK = os.path.join(HERE, "_work", "cifar-labeling")

LF_FILE = '''
from webcurate.curation.labeling import factories as F

CLASSES = {classes!r}
SEED = {seed!r}

seed_resnet = F.load_seed(SEED, CLASSES, stage="embeddings")
seed_pixels = F.load_seed(SEED, CLASSES, stage="pixels")

seed_hog = F.load_seed(SEED, CLASSES, stage="hog")
seed_color = F.load_seed(SEED, CLASSES, stage="color")

knn_resnet = F.knn_lf(seed_resnet, k=10, margin=0.3, name="knn_resnet")
proto_resnet = F.prototype_lf(seed_resnet, margin=0.02, name="proto_resnet")
knn_pixels = F.knn_lf(seed_pixels, k=10, margin=0.3, name="knn_pixels", field="pixels_embedding")
proto_pixels = F.prototype_lf(seed_pixels, margin=0.02, name="proto_pixels", field="pixels_embedding")
knn_hog = F.knn_lf(seed_hog, k=10, margin=0.3, name="knn_hog", field="hog_embedding")
proto_hog = F.prototype_lf(seed_hog, margin=0.02, name="proto_hog", field="hog_embedding")
knn_color = F.knn_lf(seed_color, k=10, margin=0.3, name="knn_color", field="color_embedding")
proto_color = F.prototype_lf(seed_color, margin=0.02, name="proto_color", field="color_embedding")
cluster_l1 = F.cluster_vote_from_seed(seed_resnet, F.load_centroids({data!r}, 1), level=1, name="cluster_l1")
cluster_l2 = F.cluster_vote_from_seed(seed_resnet, F.load_centroids({data!r}, 2), level=2, name="cluster_l2")
'''


def extract(per_class_train: int, per_class_seed: int) -> tuple[str, str, list[str]]:
    """Unpack the chosen train images and seed images (from test) into folders."""
    train_dir = os.path.join(WORK, f"raw-train-{per_class_train}")
    seed_dir = os.path.join(WORK, f"raw-seed-{per_class_seed}")
    with tarfile.open(DATA) as tar:
        members = tar.getmembers()
    classes = sorted({m.name.split("/")[-2] for m in members if m.name.endswith(".jpg")})
    if os.path.isdir(train_dir) and os.path.isdir(seed_dir):
        return train_dir, seed_dir, classes
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(DATA) as tar:
        for m in tar:
            if not m.name.endswith(".jpg"):
                continue
            parts = m.name.split("/")
            split, cls = parts[-3], parts[-2]
            limit = per_class_train if split == "train" else per_class_seed
            if counts.get((split, cls), 0) >= limit:
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            dst = os.path.join(train_dir if split == "train" else seed_dir, cls, parts[-1])
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as f:
                f.write(tar.extractfile(m).read())
    return train_dir, seed_dir, classes


def _pixels(img: np.ndarray) -> np.ndarray:
    """8x8 RGB thumbnail, 192 values in [0, 1]."""
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((8, 8), Image.BILINEAR), np.float32).reshape(-1) / 255.0


def _hog(img: np.ndarray, cells: int = 4, bins: int = 9) -> np.ndarray:
    """Histogram of gradient orientations on a 4x4 grid (144 values, sqrt-scaled)."""
    g = img.astype(np.float32).mean(-1)
    gx, gy = np.zeros_like(g), np.zeros_like(g)
    gx[:, 1:-1] = g[:, 2:] - g[:, :-2]
    gy[1:-1, :] = g[2:, :] - g[:-2, :]
    mag = np.hypot(gx, gy)
    b = np.minimum(((np.arctan2(gy, gx) % np.pi) / np.pi * bins).astype(int), bins - 1)
    h, w = g.shape
    cy, cx = np.minimum(np.arange(h) * cells // h, cells - 1), np.minimum(np.arange(w) * cells // w, cells - 1)
    cell = (cy[:, None] * cells + cx[None, :]) * bins + b
    return np.sqrt(np.bincount(cell.ravel(), weights=mag.ravel(), minlength=cells * cells * bins)).astype(np.float32)


def _color(img: np.ndarray, bins: tuple[int, int, int] = (8, 4, 4)) -> np.ndarray:
    """HSV colour histogram (128 values, sqrt-scaled)."""
    from PIL import Image

    hsv = np.asarray(Image.fromarray(img).convert("HSV")).astype(int)
    code = ((hsv[..., 0] * bins[0] // 256) * bins[1] + hsv[..., 1] * bins[1] // 256) * bins[2] \
        + hsv[..., 2] * bins[2] // 256
    return np.sqrt(np.bincount(code.ravel(), minlength=int(np.prod(bins)))).astype(np.float32)


VIEWS = {"pixels": _pixels, "hog": _hog, "color": _color}


def feature_sidecars(root: str, mean_from: str | None = None) -> None:
    """Hand-made image features as extra sidecars (``<view>/`` with column
    ``embedding``, so records get ``<view>_embedding``): centred on the mean
    of ``mean_from``'s features (the dataset being labelled) and L2-normalised."""
    import pyarrow as pa
    from PIL import Image

    from webcurate.shards import manifest as manifest_mod
    from webcurate.shards.dataset import Dataset

    ds = Dataset(root)
    todo = [v for v in VIEWS if ds.sidecar_completed(v) != ds.completed_shards()]
    if not todo:
        return
    feats: dict[str, list[np.ndarray]] = {v: [] for v in todo}
    keys: dict[int, list[str]] = {}
    for s in ds.completed_shards():
        keys[s] = []
        for smp in ds.iter_samples(s):
            img = np.asarray(Image.open(io.BytesIO(smp.image)).convert("RGB"))
            keys[s].append(smp.key)
            for v in todo:
                feats[v].append(VIEWS[v](img))
    for v in todo:
        F = np.asarray(feats[v], dtype=np.float32)
        mean_file = os.path.join(WORK, f"mean-{v}-{os.path.basename(mean_from or root)}.npy")
        if mean_from is None:
            np.save(mean_file, F.mean(axis=0))
        F = F - np.load(mean_file)
        F /= np.maximum(np.linalg.norm(F, axis=1, keepdims=True), 1e-6)
        manifest_mod.record_stage(root, v, {"view": v})
        start = 0
        for s, ks in keys.items():
            part = F[start:start + len(ks)]
            start += len(ks)
            flat = pa.array(part.reshape(-1), pa.float32())
            ds.write_sidecar(v, s, pa.table({"key": ks, "embedding": pa.FixedSizeListArray.from_arrays(flat, F.shape[1])}))
            manifest_mod.record_shard(root, s, {"counts": {"total": len(ks)}}, stage=v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 train images per class instead of 5,000")
    ap.add_argument("--per-class", type=int, default=None)
    ap.add_argument("--no-snorkel", action="store_true")
    args = ap.parse_args()
    per_class = args.per_class or (1000 if args.quick else 5000)

    from webcurate.curation.cluster import run_cluster
    from webcurate.curation.embed import run_embed
    from webcurate.curation.labeling.apply import apply_lfs, read_votes
    from webcurate.curation.labeling.label_model import LabelModel, MajorityVote
    from webcurate.curation.labeling.lf import load_lf_file
    from webcurate.curation.labeling.analysis import lf_stats, print_lf_table
    from webcurate.shards.ray_runtime import init_ray
    from webcurate.shards.dataset import Dataset
    from webcurate.shards.image_ops import ImageOptions
    from webcurate.shards.ingest import ingest_folder

    os.makedirs(WORK, exist_ok=True)
    init_ray()
    t_all = time.time()
    timings: dict[str, float] = {}
    t = time.time()
    train_dir, seed_dir, classes = extract(per_class, 10)
    timings["extract"] = time.time() - t
    data = os.path.join(WORK, f"train-{per_class}")
    seed = os.path.join(WORK, "seed-10")
    opts = ImageOptions(reencode=False)
    t = time.time()
    if not Dataset(data).exists() or not Dataset(data).completed_shards():
        ingest_folder(train_dir, data, shard_size=2500, image_opts=opts, dedup=False, summary=False)
    if not Dataset(seed).exists() or not Dataset(seed).completed_shards():
        ingest_folder(seed_dir, seed, labels_from_dirs=True, shard_size=1000, image_opts=opts, dedup=False,
                      summary=False)
    timings["ingest"] = time.time() - t
    t = time.time()
    for root in (data, seed):
        run_embed(root, "resnet18", random_init=True, image_size=32, batch_size=256, dtype="float32", summary=False)
    feature_sidecars(data)
    feature_sidecars(seed, mean_from=data)
    timings["embed"] = time.time() - t
    t = time.time()
    run_cluster(data, levels=(100, 20), resampling_steps=1, summary=False)
    timings["cluster"] = time.time() - t

    lf_path = os.path.join(WORK, f"lfs-{per_class}.py")
    with open(lf_path, "w") as f:
        f.write(LF_FILE.format(classes=classes, seed=seed, data=data))
    lfset = load_lf_file(lf_path)
    t = time.time()
    apply_lfs(data, lfset, classes, sidecars=["embeddings", "clusters", *VIEWS], summary=False)
    timings["apply LFs (Ray)"] = time.time() - t
    votes = read_votes(data, lfset.names)
    L = votes.L
    index = Dataset(data).index(columns=["key", "source"])
    src = dict(zip(index.column("key").to_pylist(), index.column("source").to_pylist()))
    y = np.array([classes.index(src[k].split("/")[0]) for k in votes.keys])
    K = len(classes)

    def acc(pred: np.ndarray) -> tuple[float, float]:
        lab = pred >= 0
        return float((pred[lab] == y[lab]).mean()), float(lab.mean())

    results: dict[str, tuple[float, float, float]] = {}
    t = time.time()
    ours = LabelModel(K).fit(L, lfset.names)
    results["ours (labelmodel, default prior_strength=1)"] = (*acc(ours.predict(L)), time.time() - t)
    for strength in (0.0, 2.0):
        t = time.time()
        alt = LabelModel(K, prior_strength=strength).fit(L, lfset.names)
        results[f"ours, prior_strength={strength:g}"] = (*acc(alt.predict(L)), time.time() - t)
    t = time.time()
    plain = LabelModel(K, dependencies=False).fit(L, lfset.names)
    results["ours, no copy links"] = (*acc(plain.predict(L)), time.time() - t)
    results["majority vote, ties -> prior (ours)"] = (*acc(MajorityVote(K).fit(L).predict(L)), 0.0)
    results["majority vote, random ties"] = (*acc(MajorityVote(K, tie_break="random").fit(L).predict(L)), 0.0)
    if not args.no_snorkel:
        s = run_snorkel(L, K)
        if s is not None:
            results["snorkel LabelModel (default)"] = (*acc(s["pred_random"]), s["fit_seconds"])
            s2 = run_snorkel(L, K, n_epochs=500)
            results["snorkel LabelModel (500 epochs)"] = (*acc(s2["pred_random"]), s2["fit_seconds"])
            s3 = run_snorkel(L, K, mode="majority")
            results["snorkel MajorityLabelVoter, random ties"] = (*acc(s3["pred_random"]), 0.0)

    print_lf_table(lf_stats(L, lfset.names, classes, L_dev=L, y_dev=y, model=ours),
                   title=f"LFs on CIFAR-10 train ({len(y)} images; accuracy against the true labels)")
    print(f"\nCIFAR-10 train, {len(y)} images, 10 seeds/class from test, random-init ResNet-18 @32px + pixels/HOG/colour")
    print(f"{'method':42s} {'accuracy':>9s} {'coverage':>9s} {'fit s':>7s}")
    for m, (a, c, ft) in results.items():
        print(f"{m:42s} {a:9.4f} {c:9.4f} {ft:7.2f}")
    best_single = max(r.emp_accuracy or 0 for r in lf_stats(L, lfset.names, classes, L_dev=L, y_dev=y))
    print(f"best single LF accuracy (on its own coverage): {best_single:.4f}")
    print("links found:", ", ".join(f"{lfset.names[d.child]}<-{lfset.names[d.parent]}" for d in ours.dependencies))
    o = results["ours (labelmodel, default prior_strength=1)"][0]
    for m, (a, _, _) in results.items():
        if not m.startswith("ours (labelmodel"):
            print(f"ratio ours / {m}: {o / a:.3f}")
    print("timings (s):", ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), f"| total {time.time() - t_all:.1f}")


if __name__ == "__main__":
    main()
