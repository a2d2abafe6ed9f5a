"""The one recipe for synthetic test photos, shared by every test helper.

Loaded as the top-level module ``photos``: ``tests/conftest.py`` puts this
folder on ``sys.path`` (tests are not a package), and ``shards/imagegen.py``
does the same for the HTTP server it runs in a separate process.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def make_photo(seed: int, size: tuple[int, int] = (320, 240), cell: int = 32) -> np.ndarray:
    """A smooth random colour image, (H, W, 3) uint8, that JPEG-compresses like a photo.

    ``size`` is (width, height); ``cell`` is the pixel size of the random colour
    grid it is upsampled from (smaller = busier), plus ±12 of per-pixel noise.
    A pure function of its arguments: re-runs see identical pixels.
    """
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, size=(max(h // cell, 2), max(w // cell, 2), 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.int16)
    arr += rng.integers(-12, 13, size=arr.shape, dtype=np.int16)
    return np.clip(arr, 0, 255).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    """An (H, W, 3) uint8 array encoded as JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
