"""Test data for embed/dedup/retrieve: real JPEGs with planted near-duplicates.

Datasets are written through the real ShardWriter and manifest functions,
so they follow the data contract exactly; unlike ingest, this lets a test
plant exact duplicates and undecodable images inside the tars.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from webcurate.shards import manifest as manifest_mod
from webcurate.shards.writer import ShardWriter
from photos import jpeg_bytes, make_photo  # noqa: F401 - re-exported for the tests

VARIANTS = ("quality", "crop", "resize")


def near_duplicate(arr: np.ndarray, kind: str) -> bytes:
    """A near-duplicate of ``arr`` as JPEG bytes: re-encoded at quality 40, cropped 4 % a side, or halved."""
    im = Image.fromarray(arr)
    w, h = im.size
    if kind == "quality":
        return jpeg_bytes(arr, quality=40)
    if kind == "crop":
        dx, dy = int(w * 0.04), int(h * 0.04)
        return jpeg_bytes(np.asarray(im.crop((dx, dy, w - dx, h - dy))))
    if kind == "resize":
        return jpeg_bytes(np.asarray(im.resize((w // 2, h // 2), Image.BICUBIC)))
    raise ValueError(kind)


@dataclass
class Item:
    key: str
    image: bytes
    ext: str = "jpg"
    label: str | None = None


@dataclass
class Planted:
    """What a test dataset holds: every key, and which keys copy which."""

    root: str
    keys: list[str]
    near: dict[str, str] = field(default_factory=dict)    # near-duplicate key -> original key
    exact: dict[str, str] = field(default_factory=dict)   # byte-identical copy key -> original key
    broken: list[str] = field(default_factory=list)       # undecodable image keys
    originals: list[str] = field(default_factory=list)


def write_dataset(root: str, items: list[Item], shard_size: int) -> str:
    """Write ``items`` in order into shards of ``shard_size`` with index and manifest."""
    n_shards = max(1, -(-len(items) // shard_size))
    manifest_mod.save(root, manifest_mod.new("test", {"items": len(items)}, parent=None, num_shards=n_shards))
    for s in range(n_shards):
        w = ShardWriter(root, s)
        for it in items[s * shard_size:(s + 1) * shard_size]:
            try:
                with Image.open(io.BytesIO(it.image)) as im:
                    width, height = im.size
            except Exception:
                width = height = None  # a broken file still reaches the tar: embed must cope
            w.add(it.key, it.image, it.ext, {"source": f"test/{it.key}.{it.ext}", "label": it.label,
                                             "width": width, "height": height,
                                             "sha256": hashlib.sha256(it.image).hexdigest()})
        manifest_mod.record_shard(root, s, w.commit())
    return root


def planted_dataset(root: str, *, originals: int = 24, seed0: int = 0, near_every: int = 2,
                    exact: int = 2, broken: int = 0, shard_size: int = 16, prefix: str = "p") -> Planted:
    """Originals plus a near-duplicate of every ``near_every``-th one (cycling through
    quality / crop / resize), ``exact`` byte-identical copies and ``broken`` undecodable
    files, interleaved so duplicates land in other shards than their originals."""
    arrs = [make_photo(seed0 + i) for i in range(originals)]
    items = [Item(f"{prefix}o{i:03d}", jpeg_bytes(a), label=f"c{i % 3}") for i, a in enumerate(arrs)]
    out = Planted(root, [])
    out.originals = [it.key for it in items]
    extra: list[Item] = []
    for j, i in enumerate(range(0, originals, near_every)):
        kind = VARIANTS[j % len(VARIANTS)]
        key = f"{prefix}n{i:03d}{kind[0]}"
        extra.append(Item(key, near_duplicate(arrs[i], kind), label=items[i].label))
        out.near[key] = items[i].key
    for j in range(exact):
        src = items[1 + 2 * j]
        key = f"{prefix}x{j:03d}"
        extra.append(Item(key, src.image, label=src.label))
        out.exact[key] = src.key
    for j in range(broken):
        key = f"{prefix}b{j:03d}"
        extra.append(Item(key, b"\xff\xd8\xff\xe0 this is not a jpeg" + bytes([j])))
        out.broken.append(key)
    # Copies go in reverse order after the originals: most land in a later shard.
    all_items = items + extra[::-1]
    write_dataset(root, all_items, shard_size)
    out.keys = [it.key for it in all_items]
    return out
