"""Data for bench/labeling_cifar.py: CIFAR-10 folders -> our datasets -> embeddings.

Everything goes through the product: ``ingest_folder`` (shards),
``run_embed`` (a timm backbone: random-init ResNet-18 at 32 px by default,
or a trained backbone from ``--checkpoint`` / ``--weights``) and, with the
random-init default only, three cheap hand-made views as extra sidecars (8x8
RGB thumbnails, gradient-orientation histograms, HSV colour histograms):
random-init features are close to chance on CIFAR, the views are what the
LFs and the classifiers can use. ``views`` is one more sidecar holding all
views of an image side by side (each block centred on the pool's mean and
L2-normalised): the vectors self-training and the kNN baseline read.

Datasets (under bench/_work/cifar-labeling):
- pool: CIFAR-10 *train*, ``per_class`` images per class, no labels;
- seed-<S>: the first S *test* images per class (labelled), S in (10, 100);
- dev: the next 50 test images per class (labelled);
- open-set variants: known classes only for the seeds, and a dev set whose
  off-target classes' images are labelled ``none``.
"""
from __future__ import annotations

import io
import os
import shutil
import tarfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "cifar10.tar.gz")
WORK = os.path.join(HERE, "_work", "cifar-labeling")
TEST_PER_CLASS = 150  # 100 seeds + 50 dev per class
DEV_PER_CLASS = 50


def extract(per_class_train: int) -> tuple[str, str, list[str]]:
    """Unpack ``per_class_train`` train images and 150 test images per class into folders."""
    train_dir = os.path.join(WORK, f"raw-train-{per_class_train}")
    test_dir = os.path.join(WORK, f"raw-test-{TEST_PER_CLASS}")
    with tarfile.open(DATA) as tar:
        names = [m.name for m in tar.getmembers() if m.name.endswith(".jpg")]
    classes = sorted({n.split("/")[-2] for n in names})
    if os.path.isdir(train_dir) and os.path.isdir(test_dir):
        return train_dir, test_dir, classes
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(DATA) as tar:
        for m in tar:
            if not m.name.endswith(".jpg"):
                continue
            parts = m.name.split("/")
            split, cls = parts[-3], parts[-2]
            limit = per_class_train if split == "train" else TEST_PER_CLASS
            if counts.get((split, cls), 0) >= limit:
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            dst = os.path.join(train_dir if split == "train" else test_dir, cls, parts[-1])
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as f:
                f.write(tar.extractfile(m).read())
    return train_dir, test_dir, classes


def labelled_folder(test_dir: str, name: str, picks: dict[str, tuple[int, int]],
                    rename: dict[str, str] | None = None) -> str:
    """A folder of test images: for each class, files [a, b) of its sorted list, into class dirs
    (``rename`` maps a class to another dir name, e.g. "none")."""
    out = os.path.join(WORK, f"raw-test-{name}")
    if os.path.isdir(out):
        return out
    for cls, (a, b) in picks.items():
        files = sorted(os.listdir(os.path.join(test_dir, cls)))[a:b]
        dst = os.path.join(out, (rename or {}).get(cls, cls))
        os.makedirs(dst, exist_ok=True)
        for f in files:
            shutil.copy(os.path.join(test_dir, cls, f), os.path.join(dst, f"{cls}-{f}"))
    return out


def ingest(folder: str, root: str, labelled: bool) -> str:
    from webcurate.shards.dataset import Dataset
    from webcurate.shards.image_ops import ImageOptions
    from webcurate.shards.ingest import ingest_folder

    if not Dataset(root).exists() or not Dataset(root).completed_shards():
        ingest_folder(folder, root, labels_from_dirs=labelled, shard_size=2500, image_opts=ImageOptions(reencode=False),
                      dedup=False, summary=False)
    return root


# -- hand-made views ---------------------------------------------------------------------------
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


def _write_sidecar(root: str, stage: str, keys: dict[int, list[str]], F: np.ndarray, params: dict) -> None:
    import pyarrow as pa

    from webcurate.shards import manifest as manifest_mod
    from webcurate.shards.dataset import Dataset

    ds = Dataset(root)
    manifest_mod.record_stage(root, stage, params)
    start = 0
    for s, ks in keys.items():
        part = F[start:start + len(ks)]
        start += len(ks)
        flat = pa.array(part.reshape(-1), pa.float32())
        ds.write_sidecar(stage, s, pa.table({"key": ks, "embedding": pa.FixedSizeListArray.from_arrays(flat, F.shape[1])}))
        manifest_mod.record_shard(root, s, {"counts": {"total": len(ks)}}, stage=stage)


def _centre(F: np.ndarray, mean_file: str, is_pool: bool) -> np.ndarray:
    """Centre on the pool's mean (saved when this is the pool) and L2-normalise."""
    if is_pool:
        np.save(mean_file, F.mean(axis=0))
    F = F - np.load(mean_file)
    return (F / np.maximum(np.linalg.norm(F, axis=1, keepdims=True), 1e-6)).astype(np.float32)


def view_sidecars(root: str, work: str, is_pool: bool, backbone: str) -> None:
    """The hand-made views (``pixels``, ``hog``, ``color``) and ``views`` = [embedding | views] of every
    sample, centred on the pool's means (kept in ``work``; the pool goes first)."""
    from PIL import Image

    from webcurate.shards.dataset import Dataset

    ds = Dataset(root)
    if ds.sidecar_completed("views") == ds.completed_shards():
        return
    feats: dict[str, list[np.ndarray]] = {v: [] for v in VIEWS}
    keys: dict[int, list[str]] = {}
    for s in ds.completed_shards():
        keys[s] = []
        for smp in ds.iter_samples(s):
            img = np.asarray(Image.open(io.BytesIO(smp.image)).convert("RGB"))
            keys[s].append(smp.key)
            for v, f in VIEWS.items():
                feats[v].append(f(img))
    order = [k for ks in keys.values() for k in ks]
    emb = embeddings_by_key(root, "embeddings", order)
    blocks = [_centre(emb, os.path.join(work, "mean-embeddings.npy"), is_pool)]
    for v in VIEWS:
        F = _centre(np.asarray(feats[v], np.float32), os.path.join(work, f"mean-{v}.npy"), is_pool)
        _write_sidecar(root, v, keys, F, {"view": v})
        blocks.append(F)
    allv = np.concatenate(blocks, axis=1) / np.sqrt(len(blocks))
    _write_sidecar(root, "views", keys, allv, {"model": f"views:{backbone}+pixels+hog+color", "dim": allv.shape[1]})


def embeddings_by_key(root: str, stage: str, keys: list[str]) -> np.ndarray:
    """(n, D) vectors of ``keys`` from sidecar ``stage``."""
    from webcurate.curation.labeling.records import embedding_matrix
    from webcurate.shards.dataset import Dataset

    t = Dataset(root).read_sidecar(stage, columns=["key", "embedding"])
    E = embedding_matrix(t.column("embedding"))
    pos = {k: i for i, k in enumerate(t.column("key").to_pylist())}
    return E[[pos[k] for k in keys]]


def embed(root: str, args) -> None:
    """The backbone's ``embeddings`` sidecar (trained checkpoint / weights, else random-init ResNet-18)."""
    from webcurate.curation.embed import run_embed

    opts = dict(image_size=args.image_size, batch_size=256, dtype="float32", summary=False, calibration_samples=0)
    if args.checkpoint:
        run_embed(root, args.model, checkpoint=args.checkpoint, **opts)
    elif args.weights:
        run_embed(root, args.model, weights=args.weights, **opts)
    else:
        run_embed(root, "resnet18", random_init=True, **opts)


def backbone_name(args) -> str:
    if args.checkpoint:
        return f"{args.model} from {os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))}"
    if args.weights:
        return f"{args.model} + {os.path.basename(args.weights)}"
    return "resnet18 random-init"
