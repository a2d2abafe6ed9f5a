"""Small labelled/unlabelled datasets for the labelling tests, written with the
real shard writer and manifest (the same files `webcurate shard` and
`webcurate embed` produce): captions, URLs, sizes and an embeddings sidecar.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from webcurate.shards import manifest as manifest_mod
from webcurate.shards.dataset import Dataset
from webcurate.shards.keys import make_key
from webcurate.shards.writer import ShardWriter

CLASSES = ["cat", "dog", "bird"]
DOMAINS = {0: "cats.example.org", 1: "dogs.example.com", 2: "birds.example.net"}
WORDS = {0: ["cat", "kitten"], 1: ["dog", "puppy"], 2: ["bird", "sparrow"]}
FILLER = ["a photo of", "my favourite", "look at this", "picture:", "snapshot of"]
DIM = 16


def tiny_jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """A small smooth JPEG of ``size`` (w, h)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(2, 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def make_items(n: int, seed: int, *, balance=(0.5, 0.3, 0.2)) -> list[dict]:
    """Items with a true class ``y``, a caption that names the class 70 % of
    the time (15 % a wrong class), a class domain URL half the time, a
    class-dependent aspect ratio and a noisy class-centred embedding."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(1234).normal(size=(len(CLASSES), DIM))
    items = []
    for i in range(n):
        y = int(rng.choice(len(CLASSES), p=balance))
        r = rng.random()
        cap_class = y if r < 0.7 else (int((y + rng.integers(1, 3)) % 3) if r < 0.85 else None)
        words = f" {rng.choice(WORDS[cap_class])}" if cap_class is not None else " something"
        caption = f"{rng.choice(FILLER)}{words} #{i}"
        host = DOMAINS[y] if rng.random() < 0.5 else "cdn.example.com"
        size = (40, 24) if y == 2 else (24, 24)
        emb = centers[y] + 0.9 * rng.normal(size=DIM)
        items.append({"source": f"https://{host}/img/{seed}/{i}.jpg", "caption": caption, "y": y,
                      "size": size, "embedding": emb.astype(np.float32)})
    return items


def make_distractors(n: int, seed: int, *, dim: int = DIM) -> list[dict]:
    """Banner-like items of no class: ``y`` -1, label "none", an embedding far from every class."""
    rng = np.random.default_rng(seed)
    away = np.random.default_rng(999).normal(size=dim) * 4.0
    return [{"source": f"https://ads.example.com/{seed}/{i}.jpg", "caption": "buy now", "y": -1, "label": "none",
             "size": (32, 24), "embedding": (away + 0.9 * rng.normal(size=dim)).astype(np.float32)}
            for i in range(n)]


def write_dataset(root: str, items: list[dict], *, shard_size: int = 30, labelled: bool = False,
                  embeddings: bool = True, failed_every: int = 0, model: str = "test") -> Dataset:
    """Write ``items`` as a dataset (shards, index, manifest, embeddings sidecar).

    ``labelled``: put the class name (or the item's own ``label``) in ``label``;
    ``failed_every``: every n-th item becomes a failed index row (no image), as
    ingest records them; ``model``: the embedding model the manifest names.
    """
    num = (len(items) + shard_size - 1) // shard_size
    manifest_mod.save(root, manifest_mod.new("shard", {"test": True}, parent=None, num_shards=num))
    if embeddings:
        dim = len(items[0]["embedding"]) if items else DIM
        manifest_mod.record_stage(root, "embeddings", {"model": model, "dim": dim})
    ds = Dataset(root)
    for s in range(num):
        chunk = items[s * shard_size:(s + 1) * shard_size]
        w = ShardWriter(root, s)
        keys, embs = [], []
        for j, it in enumerate(chunk):
            key = make_key(it["source"])
            it["key"] = key
            row = {"source": it["source"], "caption": it["caption"],
                   "label": it.get("label", CLASSES[it["y"]] if it["y"] >= 0 else None) if labelled else None}
            if failed_every and (s * shard_size + j) % failed_every == failed_every - 1:
                w.add_failure(key, row, "failed", "decode: broken")
                continue
            wdt, hgt = it["size"]
            row.update(width=wdt, height=hgt)
            w.add(key, tiny_jpeg(s * 1000 + j, it["size"]), "jpg", row, caption=it["caption"])
            keys.append(key)
            embs.append(it["embedding"])
        stats = w.commit()
        manifest_mod.record_shard(root, s, stats)
        if embeddings:
            flat = pa.array(np.asarray(embs, dtype=np.float32).reshape(-1), pa.float32())
            table = pa.table({"key": pa.array(keys, pa.string()),
                              "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
                              "status": pa.array(["ok"] * len(keys)), "error": pa.array([None] * len(keys), pa.string())})
            ds.write_sidecar("embeddings", s, table)
            manifest_mod.record_shard(root, s, {"counts": {"total": len(keys)}}, stage="embeddings")
    return ds.reload()
