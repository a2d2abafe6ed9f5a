"""Deterministic test images, good and bad, as encoded bytes.

Used by the loopback HTTP server (``http_server.py``), by the ingest tests and
by the ingest benchmark. Every function is a pure function of its arguments,
so two runs of a test see byte-identical inputs.
"""
from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image

# tests/ holds the shared photo recipe; the HTTP server process loads this file without conftest.
_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
from photos import jpeg_bytes, make_photo  # noqa: E402

def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@lru_cache(maxsize=512)
def photo_jpeg(seed: int, width: int = 320, height: int = 240, quality: int = 90) -> bytes:
    """A good RGB JPEG of ``width`` x ``height``."""
    return jpeg_bytes(make_photo(seed, (width, height)), quality)


@lru_cache(maxsize=64)
def photo_png(seed: int, width: int = 320, height: int = 240) -> bytes:
    """A good RGB PNG."""
    return _encode(Image.fromarray(make_photo(seed, (width, height))), "PNG")


@lru_cache(maxsize=64)
def photo_webp(seed: int, width: int = 320, height: int = 240) -> bytes:
    """A good RGB WebP."""
    return _encode(Image.fromarray(make_photo(seed, (width, height))), "WEBP", quality=90)


@lru_cache(maxsize=16)
def cmyk_jpeg(seed: int = 7, width: int = 320, height: int = 240) -> bytes:
    """A CMYK JPEG (Adobe-style 4-channel), as print workflows put on the web."""
    return _encode(Image.fromarray(make_photo(seed, (width, height))).convert("CMYK"), "JPEG", quality=90)


@lru_cache(maxsize=16)
def png16(seed: int = 8, width: int = 320, height: int = 240) -> bytes:
    """A 16-bit greyscale PNG (mode ``I;16``) using the full 0..65535 range."""
    grey = make_photo(seed, (width, height)).mean(axis=2).astype(np.uint16) * 257
    img = Image.fromarray(grey.astype(np.uint16))  # uint16 arrays become mode I;16
    assert img.mode == "I;16", img.mode
    return _encode(img, "PNG")


@lru_cache(maxsize=16)
def animated_gif(seed: int = 9, width: int = 320, height: int = 240, frames: int = 3) -> bytes:
    """A palette GIF with ``frames`` frames; ingest keeps the first frame."""
    imgs = [Image.fromarray(make_photo(seed + i, (width, height))).convert("P") for i in range(frames)]
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=100, loop=0)
    return buf.getvalue()


@lru_cache(maxsize=16)
def exif_rotated_jpeg(seed: int = 10, width: int = 320, height: int = 240, orientation: int = 6) -> bytes:
    """A ``width`` x ``height`` JPEG whose EXIF says 'rotate' (6: 90° CW to display).

    Displayed correctly it is ``height`` x ``width``.
    """
    img = Image.fromarray(make_photo(seed, (width, height)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(img, "JPEG", quality=90, exif=exif.tobytes())


@lru_cache(maxsize=4)
def truncated_jpeg(seed: int = 11, width: int = 320, height: int = 240, keep: float = 0.5) -> bytes:
    """The first ``keep`` fraction of a JPEG: the header parses, the scan data ends early."""
    data = photo_jpeg(seed, width, height)
    return data[: int(len(data) * keep)]


def html_page() -> bytes:
    """An HTML error page, as CDNs serve with the wrong Content-Type."""
    return (b"<!DOCTYPE html><html><head><title>Not here</title></head>"
            b"<body><h1>Image not available</h1><p>Try again later.</p></body></html>")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@lru_cache(maxsize=4)
def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A real, valid decompression bomb: a 1-bit black PNG of ``width`` x ``height``.

    30000 x 30000 (900 M pixels, 2.7 GB as RGB) compresses to about 100 KB,
    so decoding it is what the validator must refuse, from the header alone.
    """
    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = []
    block = row * 256
    full, rest = divmod(height, 256)
    for _ in range(full):
        parts.append(comp.compress(block))
    parts.append(comp.compress(row * rest))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b""))


def padded_jpeg(nbytes: int, seed: int = 12) -> bytes:
    """A valid JPEG followed by zero padding up to ``nbytes`` (decoders ignore the tail),
    so only a body-size cap can reject it."""
    data = photo_jpeg(seed)
    return data + b"\x00" * max(0, nbytes - len(data))


def _photo_file(args: tuple[str, int, int, int, int]) -> int:
    path, seed, min_side, max_side, quality = args
    rng = np.random.default_rng(seed)
    w, h = (int(x) for x in rng.integers(min_side, max_side + 1, size=2))
    data = jpeg_bytes(make_photo(seed, (w, h)), quality)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def generate_photos(folder: str, n: int, *, min_side: int = 300, max_side: int = 1200,
                    quality: int = 90, seed: int = 0, processes: int = 2) -> list[str]:
    """Write ``n`` JPEG photos ``00000.jpg..`` of random sizes in [min_side, max_side]
    into ``folder`` (files already there are kept, so a re-run is free).

    Returns the file names in order.
    """
    os.makedirs(folder, exist_ok=True)
    names = [f"{i:05d}.jpg" for i in range(n)]
    todo = [(os.path.join(folder, name), seed * 1_000_003 + i, min_side, max_side, quality)
            for i, name in enumerate(names) if not os.path.exists(os.path.join(folder, name))]
    if todo:
        if processes > 1 and len(todo) > 50:
            from multiprocessing import get_context

            with get_context("fork").Pool(processes) as pool:
                list(pool.imap_unordered(_photo_file, todo, chunksize=16))
        else:
            for t in todo:
                _photo_file(t)
    return names
