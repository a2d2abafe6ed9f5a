"""A web-like pool from CIFAR-10, as the web looks to a curator (used by bench/curation_vs_random.py).

Mix (``PoolSpec``, all counts stated in the results):

- target originals: ``target_per_class`` train photos of each target class;
- off-target originals: ``offtarget_per_class`` train photos of each other class
  (the larger share, as on the web);
- reposts: ``bursts`` photos drawn from the originals above, each reposted
  ``burst_min..burst_max`` times (Zipf-like) as re-encodes (JPEG 25-85),
  crops (70-95 % of a side), resizes (down to 14-24 px, some blown back up),
  colour shifts (brightness / contrast / saturation 0.7-1.3), mirror images,
  and two or three of these at once;
- junk: blank / near-constant images (flat colours, faint gradients, a little
  noise), text-like banners (slogans on flat colours, square and 3:1 wide) and
  noise (uniform, Gaussian, salt and pepper);
- contamination: re-encoded or cropped copies of evaluation test photos.

Besides the pool: a labelled seed set (``seeds_per_class`` per target class), an
evaluation bank (``bank_per_class``, the k-NN / linear-probe training side) and
the evaluation test set (CIFAR-10 test photos of the target classes), all
disjoint. Every pool row records ``kind`` (target / offtarget / repost / junk /
contaminated), ``true_class`` and ``origin`` (the source photo) in its index;
no curation stage reads them (they hold no `label`), they are only counted.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
WORDS = ("SALE", "50% OFF", "BUY NOW", "FREE", "CLICK HERE", "NEW", "WIN", "BEST PRICE", "LIMITED", "SHOP",
         "DEAL", "TODAY ONLY", "www.shop.com", "SUBSCRIBE", "HOT", "XXL", "LOGIN", "404")


@dataclass
class PoolSpec:
    targets: tuple[str, ...] = ("airplane", "automobile", "ship", "truck")
    target_per_class: int = 600
    offtarget_per_class: int = 1500
    bursts: int = 150
    burst_min: int = 8
    burst_max: int = 60
    junk_blank: int = 500
    junk_banner: int = 500
    junk_noise: int = 500
    contaminated: int = 200
    seeds_per_class: int = 40
    bank_per_class: int = 500
    test_per_class: int = 1000
    seed: int = 0
    shard_size: int = 1000
    extra: dict = field(default_factory=dict)

    @classmethod
    def small(cls) -> "PoolSpec":
        return cls(target_per_class=100, offtarget_per_class=250, bursts=25, burst_min=4, burst_max=20,
                   junk_blank=80, junk_banner=80, junk_noise=80, contaminated=30, seeds_per_class=20,
                   bank_per_class=150, test_per_class=200, shard_size=500)


def read_cifar(path: str) -> dict[str, dict[str, list[bytes]]]:
    """{split: {class: [jpeg bytes in file-name order]}} of the CIFAR-10 archive."""
    out: dict[str, dict[str, list[tuple[str, bytes]]]] = {"train": {}, "test": {}}
    with tarfile.open(path, "r:gz") as tar:
        for m in tar:
            parts = m.name.split("/")
            if m.isfile() and m.name.endswith(".jpg") and len(parts) >= 3 and parts[-3] in out:
                out[parts[-3]].setdefault(parts[-2], []).append((m.name, tar.extractfile(m).read()))
    return {s: {c: [d for _, d in sorted(v)] for c, v in d.items()} for s, d in out.items()}


def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def repost(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One repost of a photo: 1-3 of re-encode / crop / resize / colour shift / mirror."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    ops = list(rng.choice(["crop", "resize", "colour", "mirror", "reencode"], size=int(rng.integers(1, 4)),
                          replace=False))
    for op in ops:
        w, h = im.size
        if op == "crop":
            f = rng.uniform(0.7, 0.95)
            cw, ch = max(8, int(w * f)), max(8, int(h * f))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            im = im.crop((x, y, x + cw, y + ch))
        elif op == "resize":
            s = int(rng.integers(14, 25))
            im = im.resize((s, s), Image.BILINEAR)
            if rng.random() < 0.5:
                im = im.resize((32, 32), Image.BICUBIC)
        elif op == "colour":
            for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                im = enh(im).enhance(float(rng.uniform(0.7, 1.3)))
        elif op == "mirror":
            im = ImageOps.mirror(im)
    q = int(rng.integers(25, 86)) if "reencode" in ops else 90
    return _jpeg(im, q), "+".join(sorted(ops))


def junk(kind: str, rng: np.random.Generator) -> bytes:
    """A blank / banner / noise image as JPEG bytes."""
    if kind == "blank":
        base = rng.integers(0, 256, size=3).astype(np.float32)
        arr = np.broadcast_to(base, (32, 32, 3)).copy()
        if rng.random() < 0.5:  # a faint gradient
            arr += np.linspace(-6, 6, 32, dtype=np.float32)[None, :, None] * rng.uniform(0, 1)
        arr += rng.normal(0, rng.uniform(0, 1.5), size=arr.shape)
        return _jpeg(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), 90)
    if kind == "banner":
        w, h = (32, 32) if rng.random() < 0.5 else (96, 32)
        bg, fg = tuple(int(v) for v in rng.integers(0, 256, 3)), tuple(int(v) for v in rng.integers(0, 256, 3))
        im = Image.new("RGB", (w, h), bg)
        d = ImageDraw.Draw(im)
        for row in range(int(rng.integers(1, 4))):
            d.text((int(rng.integers(0, 6)), 2 + 10 * row), str(rng.choice(WORDS)), fill=fg)
        return _jpeg(im, 90)
    if kind == "noise":
        r = rng.random()
        if r < 0.4:
            arr = rng.integers(0, 256, (32, 32, 3))
        elif r < 0.8:
            arr = rng.normal(128, rng.uniform(30, 80), (32, 32, 3))
        else:
            arr = np.where(rng.random((32, 32, 1)) < 0.5, 0, 255) * np.ones((1, 1, 3))
        return _jpeg(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), 90)
    raise ValueError(kind)


def write_dataset(root: str, rows: list[dict], shard_size: int) -> str:
    """Rows {key, data, **index fields} into shards through the real ShardWriter (order kept)."""
    from webcurate.shards import manifest as manifest_mod
    from webcurate.shards.writer import ShardWriter

    n_shards = max(1, -(-len(rows) // shard_size))
    manifest_mod.save(root, manifest_mod.new("bench", {"n": len(rows)}, parent=None, num_shards=n_shards))
    for s in range(n_shards):
        w = ShardWriter(root, s)
        for r in rows[s * shard_size:(s + 1) * shard_size]:
            data = r["data"]
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
            meta = {k: v for k, v in r.items() if k not in ("key", "data")}
            w.add(r["key"], data, "jpg", {"source": f"bench/{r['key']}.jpg", "width": width, "height": height,
                                          "sha256": hashlib.sha256(data).hexdigest(), **meta})
        manifest_mod.record_shard(root, s, w.commit())
    return root


def build(cifar: str, workdir: str, spec: PoolSpec) -> dict[str, str]:
    """Write pool, seeds, bank and test datasets under ``workdir`` (kept when the spec is unchanged)."""
    paths = {n: os.path.join(workdir, n) for n in ("pool", "seeds", "bank", "test")}
    stamp = os.path.join(workdir, "pool_spec.json")
    if os.path.exists(stamp) and json.load(open(stamp)) == asdict(spec) and all(
            os.path.exists(os.path.join(p, "_manifest.json")) for p in paths.values()):
        return paths
    import shutil

    for p in paths.values():
        shutil.rmtree(p, ignore_errors=True)
    os.makedirs(workdir, exist_ok=True)
    data = read_cifar(cifar)
    rng = np.random.default_rng(spec.seed)
    pool: list[dict] = []
    seeds, bank, test = [], [], []
    originals: list[tuple[str, str, bytes]] = []  # (key, class, bytes)
    for cls in CLASSES:
        photos = data["train"][cls]
        order = rng.permutation(len(photos))
        target = cls in spec.targets
        n_pool = spec.target_per_class if target else spec.offtarget_per_class
        for j, i in enumerate(order[:n_pool]):
            key = f"{cls}_{int(i):04d}"
            pool.append({"key": key, "data": photos[i], "kind": "target" if target else "offtarget",
                         "true_class": cls, "origin": key})
            originals.append((key, cls, photos[i]))
        if target:
            rest = order[n_pool:]
            for i in rest[:spec.seeds_per_class]:
                seeds.append({"key": f"seed_{cls}_{int(i):04d}", "data": photos[i], "label": cls})
            for i in rest[spec.seeds_per_class:spec.seeds_per_class + spec.bank_per_class]:
                bank.append({"key": f"bank_{cls}_{int(i):04d}", "data": photos[i], "label": cls})
            for i, d in enumerate(data["test"][cls][:spec.test_per_class]):
                test.append({"key": f"test_{cls}_{i:04d}", "data": d, "label": cls})
    # Reposts: a few photos posted many times (Zipf-like burst sizes).
    src = rng.choice(len(originals), size=spec.bursts, replace=False)
    sizes = np.clip((spec.burst_max / rng.zipf(1.6, size=spec.bursts)).astype(int), spec.burst_min, spec.burst_max)
    for b, (i, n) in enumerate(zip(src, sizes)):
        key, cls, photo = originals[i]
        for r in range(int(n)):
            img, ops = repost(photo, rng)
            pool.append({"key": f"repost_{key}_{r:02d}", "data": img, "kind": "repost", "true_class": cls,
                         "origin": key, "variant": ops})
    for kind, n in (("blank", spec.junk_blank), ("banner", spec.junk_banner), ("noise", spec.junk_noise)):
        for j in range(n):
            pool.append({"key": f"junk_{kind}_{j:04d}", "data": junk(kind, rng), "kind": "junk",
                         "true_class": None, "origin": f"junk_{kind}_{j:04d}", "variant": kind})
    for j, i in enumerate(rng.choice(len(test), size=min(spec.contaminated, len(test)), replace=False)):
        t = test[i]
        img, ops = repost(t["data"], rng)
        pool.append({"key": f"contam_{t['key']}", "data": img, "kind": "contaminated", "true_class": t["label"],
                     "origin": t["key"], "variant": ops})
    pool = [pool[i] for i in rng.permutation(len(pool))]  # copies land in other shards than their photo
    for rows, name in ((pool, "pool"), (seeds, "seeds"), (bank, "bank"), (test, "test")):
        write_dataset(paths[name], rows, spec.shard_size)
    json.dump(asdict(spec), open(stamp, "w"))
    return paths


def mix(root: str, targets: tuple[str, ...]) -> dict[str, int]:
    """Counts by kind of a pool (or any subset of it), plus target photos and extra copies of one photo.

    ``target_photos``: distinct target-class photos (originals, reposts and contamination
    counted once per source photo); ``duplicates``: samples beyond the first of each source photo.
    """
    from webcurate.shards.dataset import Dataset

    t = Dataset(root).index(columns=["key", "kind", "true_class", "origin", "status"], status="ok")
    kinds, classes, origins = t["kind"].to_pylist(), t["true_class"].to_pylist(), t["origin"].to_pylist()
    out: dict[str, int] = {"total": len(kinds)}
    for k in kinds:
        out[k] = out.get(k, 0) + 1
    out["target_class_samples"] = sum(c in targets for c in classes)
    out["target_photos"] = len({o for o, c in zip(origins, classes) if c in targets})
    out["duplicates"] = len(origins) - len(set(origins))
    return out
