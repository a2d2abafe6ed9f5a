"""Test data for the quality filters: real photos next to one planted defect each.

``junk_dataset`` writes, through the real ShardWriter, a few smooth test
photos with ordinary captions and one sample per defect the filters know,
and returns which filter each planted sample must fail.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from webcurate.shards import manifest as manifest_mod
from webcurate.shards.writer import ShardWriter
from photos import jpeg_bytes, make_photo

SIZE = (160, 120)


def photo(seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    return make_photo(seed, size=size, cell=16)


def banner() -> np.ndarray:
    im = Image.new("RGB", SIZE, "white")
    d = ImageDraw.Draw(im)
    for row in range(6):
        d.text((4, 4 + 18 * row), "SALE  50% OFF  BUY NOW", fill="black")
    return np.asarray(im)


def defects() -> dict[str, tuple[bytes, str]]:
    """key -> (image bytes, the filter it must fail)."""
    rng = np.random.default_rng(0)
    p = photo(900)
    tiny = Image.fromarray(photo(901, (20, 15))).resize(SIZE, Image.BICUBIC)
    return {
        "j_blank": (jpeg_bytes(np.full((*SIZE[::-1], 3), 128, np.uint8)), "blank"),
        "j_dark": (jpeg_bytes((p * 0.04).astype(np.uint8)), "dark"),
        "j_bright": (jpeg_bytes((255 - (255 - p.astype(float)) * 0.04).astype(np.uint8)), "bright"),
        "j_noise": (jpeg_bytes(rng.integers(0, 256, (*SIZE[::-1], 3), dtype=np.uint8), quality=95), "noise"),
        "j_banner": (jpeg_bytes(banner(), quality=95), "low_information"),
        "j_blurry": (jpeg_bytes(np.asarray(Image.fromarray(photo(902)).filter(ImageFilter.GaussianBlur(6)))),
                     "blurry"),
        "j_upscaled": (jpeg_bytes(np.asarray(tiny), quality=95), "upscaled"),
        "j_blocky": (jpeg_bytes(photo(903), quality=3), "jpeg_artefacts"),
        "j_wide": (jpeg_bytes(photo(904, (400, 80))), "aspect"),
        "j_small": (jpeg_bytes(photo(905, (12, 12))), "small"),
        "j_gray": (jpeg_bytes(np.repeat(photo(906)[..., :1], 3, axis=2)), "grayscale"),
        "j_broken": (b"\xff\xd8\xff\xe0 not a jpeg at all", "undecodable"),
    }


def write(root: str, items: list[tuple[str, bytes, str | None]], shard_size: int = 8) -> str:
    """(key, image bytes, caption) in order into shards of ``shard_size``, with index and manifest."""
    n_shards = max(1, -(-len(items) // shard_size))
    manifest_mod.save(root, manifest_mod.new("test", {"items": len(items)}, parent=None, num_shards=n_shards))
    for s in range(n_shards):
        w = ShardWriter(root, s)
        for key, data, caption in items[s * shard_size:(s + 1) * shard_size]:
            try:
                with Image.open(io.BytesIO(data)) as im:
                    width, height = im.size
            except Exception:
                width = height = None
            w.add(key, data, "jpg", {"source": f"test/{key}.jpg", "width": width, "height": height,
                                     "caption": caption, "sha256": hashlib.sha256(data).hexdigest()},
                  caption=caption)
        manifest_mod.record_shard(root, s, w.commit())
    return root


def junk_dataset(root: str, photos: int = 8) -> dict[str, str]:
    """Photos ``g000..`` (kept) plus every defect; returns key -> the filter it must fail ('' = kept).

    Caption defects ride on good photos: ``c_file`` (IMG_1234.jpg), ``c_url``,
    ``c_symbols`` and ``c_dup0..c_dup3`` sharing one boilerplate caption.
    """
    items: list[tuple[str, bytes, str | None]] = []
    expect: dict[str, str] = {}
    for i in range(photos):
        items.append((f"g{i:03d}", jpeg_bytes(photo(i)), f"a red bicycle number {i} by the river"))
        expect[f"g{i:03d}"] = ""
    for key, (data, reason) in defects().items():
        items.append((key, data, f"sample {key}"))
        expect[key] = reason
    for key, caption, reason in (("c_file", "IMG_1234.jpg", "caption_filename"),
                                 ("c_url", "https://example.com/p/1.jpg", "caption_url_only"),
                                 ("c_symbols", "!!! 2024 ***", "caption_no_letters"),
                                 *((f"c_dup{i}", "<b>Click</b>  to ENLARGE", "caption_duplicate") for i in range(4))):
        items.append((key, jpeg_bytes(photo(500 + len(items))), caption))
        expect[key] = reason
    # Interleave so each shard holds photos and defects.
    order = sorted(range(len(items)), key=lambda i: (i % 3, i))
    write(root, [items[i] for i in order])
    return expect
