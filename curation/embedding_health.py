"""Do these embeddings tell images apart? Health summary and copy-threshold calibration (``embed``).

``health``: on a seeded sample of the pool's vectors, the mean pairwise
cosine, the effective rank (exp of the entropy of the singular values of the
centred sample, Roy & Vetterli 2007) and the share of vectors with a
near-identical neighbour (cosine > 0.99). A random-init or collapsed
backbone puts every image close to every other: ``warning`` then says so in
one line, before dedup merges the pool into one component.

``calibrate``: a fixed cosine such as DINOv2's 0.6 assumes a copy-detection
model. Here ``samples`` pool images are embedded again as augmented copies
(JPEG re-encode, crop, resize, colour shift); the threshold is where the
copies separate best from each pool vector's nearest other vector (``RULE``),
never below where 0.1 % of random pairs lie. The copy recall at it, and the
false-pair rates (random pairs, nearest neighbours), go into the stage
record; ``dedup --threshold auto`` uses the threshold. Where many pool
vectors have a nearest other above it, ``embed`` warns.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np

from .embedding_parts import read_part
from .ray_tasks import map_tasks

HEALTH_SAMPLE = 4096
NEAR_IDENTICAL = 0.99
RANDOM_FALSE_RATE = 0.001
AUGMENTATIONS = ("reencode", "crop", "resize", "colour")
# Above these the vectors do not separate images (a collapsed backbone: mean cosine ~0.9+, nearly every
# vector near-identical to another; a trained one or a useful random-init ConvNet: ~0.1-0.5). A pool that
# is mostly duplicates has many near-identical neighbours but a low mean cosine.
WARN_MEAN_COSINE = 0.8
WARN_NEAR_IDENTICAL = 0.9
# Above this share of pool images with a nearest other image over the copy threshold, copy-dedup merges
# similar photos too (dedup_cifar: 6.7 % on a 48 %-k-NN CIFAR backbone, copy precision 0.15).
NEIGHBOUR_WARN_RATE = 0.05


def sample_vectors(root: str, shards: list[int], dim: int, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` vectors from parts spread over the dataset (seeded): (m, D) float32 normalised."""
    rng = np.random.default_rng(seed)
    picks = shards if len(shards) <= 16 else [shards[i] for i in np.linspace(0, len(shards) - 1, 16).astype(int)]
    per = max(1, -(-n // len(picks))) if picks else 0
    out = []
    for s in picks:
        x = read_part(root, s, dim).vectors
        out.append(x if len(x) <= per else x[np.sort(rng.choice(len(x), per, replace=False))])
    return np.concatenate(out)[:n] if out else np.zeros((0, dim), np.float32)


def nearest_other(x: np.ndarray) -> np.ndarray:
    """(m,) cosine of each row to its nearest other row (-1 when alone)."""
    g = x @ x.T
    np.fill_diagonal(g, -np.inf)
    return g.max(axis=1) if len(x) > 1 else np.full(len(x), -1.0, np.float32)


def health_of(x: np.ndarray) -> dict[str, Any]:
    """The health figures of a sample (m, D) normalised, with a one-line ``warning`` when they are bad."""
    m = len(x)
    if m < 2:
        return {"sample": m}
    mean_cos = float((x.sum(0) @ x.sum(0) - m) / (m * (m - 1)))
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    p = s / max(s.sum(), 1e-12)
    erank = float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
    near = float((nearest_other(x) > NEAR_IDENTICAL).mean())
    out: dict[str, Any] = {"sample": m, "mean_cosine": round(mean_cos, 4), "effective_rank": round(erank, 1),
                           "dim": int(x.shape[1]), "near_identical_share": round(near, 4)}
    if mean_cos > WARN_MEAN_COSINE or near > WARN_NEAR_IDENTICAL:  # a pool of duplicates alone stays below
        out["warning"] = (f"these embeddings do not separate images (mean pairwise cosine {mean_cos:.2f}, "
                          f"{near:.0%} have a near-identical neighbour, effective rank {erank:.0f} of "
                          f"{x.shape[1]}): a random-init or collapsed backbone? dedup and retrieval on them "
                          "mean little")
    return out


def health_task(_: int, *, root: str, shards: list[int], dim: int) -> dict[str, Any]:
    return health_of(sample_vectors(root, shards, dim, HEALTH_SAMPLE))


def health(root: str, shards: list[int], dim: int) -> dict[str, Any]:
    """The embedding health of dataset ``root`` (a Ray task reading a sample of its parts)."""
    return map_tasks(health_task, [0], kwargs={"root": root, "shards": shards, "dim": dim}, desc="health")[0]


def augment(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    """An augmented copy of an encoded image as JPEG bytes (what a repost does to a photo)."""
    from PIL import Image, ImageEnhance

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        quality = 90
        if kind == "reencode":
            quality = 30
        elif kind == "crop":
            cw, ch = max(1, int(w * 0.85)), max(1, int(h * 0.85))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            im = im.crop((x0, y0, x0 + cw, y0 + ch))
        elif kind == "resize":
            im = im.resize((max(1, w // 2), max(1, h // 2)), Image.BICUBIC)
        elif kind == "colour":
            im = ImageEnhance.Color(ImageEnhance.Brightness(im).enhance(1.15)).enhance(1.25)
        else:
            raise ValueError(kind)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


def _with_copies(originals: list[bytes], rng: np.random.Generator) -> tuple[list[bytes], list[bytes]]:
    """The decodable originals and their augmented copies (``AUGMENTATIONS`` per original, in order)."""
    kept, copies = [], []
    for o in originals:
        try:
            made = [augment(o, kind, rng) for kind in AUGMENTATIONS]
        except Exception:  # noqa: BLE001 - an undecodable sample has no copies to embed; leave it out
            continue
        kept.append(o)
        copies += made
    return kept, copies


def _embed_images(images: list[bytes], spec, info) -> np.ndarray:
    """(n, D) embeddings of encoded images with the very pipeline of ``embed`` (failed ones NaN)."""
    from .embed import STATUS_FAILED, STATUS_OK, _Embedder, decode_image

    model = _Embedder(spec, info.weights_sha256, threads=0)
    size = int(info.image_size)
    out = []
    for start in range(0, len(images), 64):
        chunk = images[start:start + 64]
        pixels = np.zeros((len(chunk), size, size, 3), dtype=np.uint8)
        status = np.full(len(chunk), STATUS_OK, dtype=object)
        for i, data in enumerate(chunk):
            try:
                pixels[i] = decode_image(data, size)
            except Exception:  # noqa: BLE001 - an undecodable sample is left out of the calibration
                status[i] = STATUS_FAILED
        n = len(chunk)
        batch = {"key": np.array([""] * n, dtype=object), "shard": np.zeros(n, np.int64),
                 "pos": np.arange(n), "n": np.full(n, n), "status": status,
                 "error": np.array([""] * n, dtype=object), "pixels": pixels}
        out.append(model(batch)["embedding"])
    return np.concatenate(out) if out else np.zeros((0, info.dim), np.float32)


def calibration_task(_: int, *, root: str, shards: list[int], spec, info, samples: int, seed: int) -> dict[str, Any]:
    """Copy recall and false-pair rates of augmented pool images; the threshold where they separate."""
    from webcurate.shards.dataset import Dataset

    rng = np.random.default_rng(seed)
    ds = Dataset(root)
    picks = shards if len(shards) <= 8 else [shards[i] for i in np.linspace(0, len(shards) - 1, 8).astype(int)]
    originals: list[bytes] = []
    for s in picks:
        got = [smp.image for smp in ds.iter_samples(s)]
        take = max(1, -(-samples // len(picks)))
        originals += [got[i] for i in np.sort(rng.permutation(len(got))[:take])]
    originals, copies = _with_copies(originals[:samples], rng)
    emb = _embed_images(originals + copies, spec, info)
    base, aug = emb[:len(originals)], emb[len(originals):].reshape(len(originals), len(AUGMENTATIONS), -1)
    copy_sim = np.einsum("nd,nkd->nk", base, aug)
    ok = np.isfinite(copy_sim)
    negatives = nearest_other(sample_vectors(root, shards, info.dim, HEALTH_SAMPLE, seed))
    random_pairs = base @ base.T
    random_pairs = random_pairs[np.triu_indices(len(base), 1)]
    random_pairs = random_pairs[np.isfinite(random_pairs)]
    threshold = choose_threshold(copy_sim[ok], negatives, random_pairs)
    return {"threshold": round(threshold, 4), "copy_recall": round(float((copy_sim[ok] > threshold).mean()), 4),
            "false_pair_rate": round(float((random_pairs > threshold).mean()), 5) if len(random_pairs) else None,
            "neighbour_false_rate": round(float((negatives > threshold).mean()), 4),
            "recall_by_augmentation": {k: round(float((copy_sim[:, j][ok[:, j]] > threshold).mean()), 4)
                                       for j, k in enumerate(AUGMENTATIONS)},
            "copy_cosine_median": round(float(np.median(copy_sim[ok])), 4) if ok.any() else None,
            "neighbour_cosine_median": round(float(np.median(negatives)), 4) if len(negatives) else None,
            "samples": len(originals), "pool_sample": int(len(negatives)), "rule": RULE,
            **neighbour_warning(threshold, float((negatives > threshold).mean()) if len(negatives) else 0.0)}


def neighbour_warning(threshold: float, rate: float) -> dict[str, str]:
    """``{"warning": ...}`` when many pool images have a nearest other image above the copy threshold.

    Random pairs say little on a backbone that is not a copy detector: a photo's
    nearest other photo can be almost as close as its own copy. Some of those
    neighbours are the pool's real duplicates, so this warns rather than refuses.
    """
    if rate <= NEIGHBOUR_WARN_RATE:
        return {}
    return {"warning": f"copy threshold {threshold:.3f}: {rate:.1%} of sampled pool images have a nearest other "
                       f"image above it: the pool's own duplicates, or similar photos this backbone does not tell "
                       f"from copies (a copy-detection model does); check dedup's largest components, or dedup "
                       f"on pixel views (--pixel-threshold 0.96 with a --threshold above {threshold:.3f})"}


RULE = ("threshold: where (copies above it) - (pool vectors whose nearest other vector is above it) is largest "
        f"(middle of the best range), and at least where {RANDOM_FALSE_RATE:.1%} of the random pairs less similar "
        "than copies lie above it")


def _above(sorted_values: np.ndarray, t: np.ndarray) -> np.ndarray:
    return 1.0 - np.searchsorted(sorted_values, t, side="right") / max(len(sorted_values), 1)


def choose_threshold(copies: np.ndarray, neighbours: np.ndarray, random_pairs: np.ndarray) -> float:
    """The cosine that best separates augmented copies from pool neighbours (see ``RULE``).

    Pool neighbours include the pool's own duplicates, which sit with the copies:
    they lower every threshold's score alike, so the best range still lies
    between the copies and the true neighbours. Random pairs are rarely
    duplicates: their quantile keeps the threshold above unrelated images.
    """
    if not len(copies) or not len(neighbours):
        return 0.6
    c, n = np.sort(copies), np.sort(neighbours)
    grid = np.unique(np.concatenate([c, n]))
    score = _above(c, grid) - _above(n, grid)
    best = np.flatnonzero(score >= score.max() - 1e-9)
    run = best[: np.argmax(np.diff(np.r_[best, best[-1] + 2]) > 1) + 1]  # the first range of best scores
    lo = grid[run[0]]
    hi = grid[run[-1] + 1] if run[-1] + 1 < len(grid) else grid[run[-1]]
    t = (lo + hi) / 2
    unrelated = random_pairs[random_pairs < hi]  # pairs as close as copies are the pool's own duplicates
    if len(unrelated):
        t = max(t, float(np.quantile(unrelated, 1 - RANDOM_FALSE_RATE)))
    return float(min(t, 0.999))


def calibrate(root: str, shards: list[int], spec, info, samples: int, health_info: dict | None = None,
              seed: int = 0) -> dict[str, Any]:
    """The copy-threshold calibration of dataset ``root`` (one Ray task that runs the embedding model)."""
    return map_tasks(calibration_task, [0], kwargs={"root": root, "shards": shards, "spec": spec, "info": info,
                                                    "samples": samples, "seed": seed},
                     desc="calibrate", memory=None)[0]
