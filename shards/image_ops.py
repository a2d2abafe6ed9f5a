"""Validate, orient, convert and resize one image; every rejection has a reason.

Fast paths: the header is read before any pixel is decoded (decompression
bombs are rejected from their declared size), JPEGs are decoded with
``Image.draft`` so the DCT-domain downscale does most of the resizing, and the
rest of a downscale is OpenCV's SIMD resize.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import threading
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# We check pixel counts ourselves, before decoding, against our own limit.
Image.MAX_IMAGE_PIXELS = None
# Our shard tasks already run one thread per image; OpenCV's own pool would oversubscribe the cores.
cv2.setNumThreads(1)

RESIZE_MODES = ("none", "keep_ratio", "center_crop", "border")


@dataclass(frozen=True)
class ImageOptions:
    """How images are checked and transformed (img2dataset-compatible meanings).

    ``keep_ratio``: shorter side to ``image_size``; ``center_crop``: shorter
    side to ``image_size`` then a centred square crop; ``border``: fit inside a
    square of ``image_size`` and pad; ``none``: keep the size. Images are
    never upscaled unless ``upscale`` is set.
    """

    image_size: int = 256
    resize_mode: str = "keep_ratio"
    min_side: int = 16
    max_pixels: int = 89_478_485  # Pillow's own bomb threshold
    max_aspect_ratio: float = 10.0
    jpeg_quality: int = 95
    output_format: str = "jpg"  # jpg | png | webp
    upscale: bool = False
    reencode: bool = True  # False: keep original bytes when no resize is needed
    # Decoded pixels one task may hold at once over all its threads (two images at the
    # per-image limit): eight 9000x9000 PNGs in flight must not take a worker to 3 GB.
    max_task_pixels: int = 2 * 89_478_485

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.output_format not in ("jpg", "png", "webp"):
            raise ValueError(f"output format must be jpg, png or webp, got {self.output_format!r}")


class PixelBudget:
    """A weighted semaphore over decoded pixels, shared by the threads of one task.

    An image larger than the whole budget still runs, alone, so nothing that
    passes the per-image limit can wait forever.
    """

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self.used = 0
        self.peak = 0  # the most pixels held at once (reported, and pinned by the tests)
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int):
        want = min(max(1, int(pixels)), self.limit)
        with self._cond:
            while self.used + want > self.limit:
                self._cond.wait()
            self.used += want
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= want
                self._cond.notify_all()


class ImageRejected(Exception):
    """The image fails validation; ``reason`` is the short status code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ProcessedImage:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int
    sha256: str  # of the decoded (oriented, RGB) pixels: same picture, same hash


def _target_size(w: int, h: int, opts: ImageOptions) -> tuple[int, int]:
    s = opts.image_size
    if opts.resize_mode == "none":
        return w, h
    if opts.resize_mode in ("keep_ratio", "center_crop"):
        scale = s / min(w, h)
    else:  # border: fit inside s x s
        scale = s / max(w, h)
    if scale >= 1 and not opts.upscale:
        return w, h
    return max(1, round(w * scale)), max(1, round(h * scale))


def process_image(data: bytes, opts: ImageOptions, budget: PixelBudget | None = None) -> ProcessedImage:
    """Check and transform encoded image bytes; raise ``ImageRejected`` on bad input.

    With a ``budget`` the decoded pixels count against it from decode to encode.
    """
    img, orientation = _open_checked(data, opts)
    w0, h0 = img.size
    rotated = orientation in (5, 6, 7, 8)
    ow, oh = (h0, w0) if rotated else (w0, h0)
    tw, th = _target_size(ow, oh, opts)
    if img.format == "JPEG" and (tw, th) != (ow, oh):
        # DCT-domain downscale to at least the target size (size is pre-rotation).
        dw, dh = (th, tw) if rotated else (tw, th)
        img.draft("RGB", (dw, dh))
    with budget.hold(img.width * img.height) if budget is not None else contextlib.nullcontext():
        img = _decode(img)
        img = _transform(img, (tw, th), opts)
        pixels_hash = hashlib.sha256(img.tobytes()).hexdigest()
        if img.size == (w0, h0) and orientation == 1 and not opts.reencode:
            return ProcessedImage(data, _ext_of_format(Image.open(io.BytesIO(data)).format), img.width, img.height,
                                  ow, oh, pixels_hash)
        return ProcessedImage(_encode(img, opts), opts.output_format, img.width, img.height, ow, oh, pixels_hash)


def _open_checked(data: bytes, opts: ImageOptions) -> tuple[Image.Image, int]:
    """The lazily opened image and its EXIF orientation, after the header-only checks."""
    if not data:
        raise ImageRejected("empty", "zero bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", "not a decodable image format")
    except Exception as e:
        raise ImageRejected("not_an_image", f"{type(e).__name__}: {e}")
    w0, h0 = img.size
    if w0 * h0 > opts.max_pixels:
        raise ImageRejected("decompression_bomb", f"{w0}x{h0} exceeds {opts.max_pixels} pixels")
    if min(w0, h0) < opts.min_side:
        raise ImageRejected("too_small", f"{w0}x{h0} < min side {opts.min_side}")
    if max(w0, h0) / max(1, min(w0, h0)) > opts.max_aspect_ratio:
        raise ImageRejected("bad_aspect_ratio", f"{w0}x{h0} exceeds aspect ratio {opts.max_aspect_ratio}")
    try:
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: treat as upright
        orientation = 1
    return img, orientation


def _decode(img: Image.Image) -> Image.Image:
    """Decoded (first frame), upright, 8-bit RGB pixels."""
    try:
        img.seek(0)  # animated images: first frame
        img.load()
    except OSError as e:
        msg = str(e)
        reason = "truncated" if "truncated" in msg.lower() or "broken data stream" in msg.lower() else "decode_error"
        raise ImageRejected(reason, msg)
    except Exception as e:
        raise ImageRejected("decode_error", f"{type(e).__name__}: {e}")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - keep the stored orientation
        pass
    return _to_rgb(img)


def _downscale(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """OpenCV's SIMD resize: after a JPEG's DCT-domain draft the factor left is under 2, where
    bilinear needs no antialiasing (0.24 ms vs Pillow's 1.3 ms per image, measured in
    bench/results/ingest.md); larger factors (PNG, WebP: no draft) average areas."""
    factor = min(img.width / size[0], img.height / size[1])
    interpolation = cv2.INTER_LINEAR if factor < 2 else cv2.INTER_AREA
    return Image.fromarray(cv2.resize(np.asarray(img), size, interpolation=interpolation))


def _transform(img: Image.Image, size: tuple[int, int], opts: ImageOptions) -> Image.Image:
    tw, th = size
    if img.size != (tw, th):
        img = _downscale(img, (tw, th)) if tw < img.width else img.resize((tw, th), Image.BICUBIC)
    if opts.resize_mode == "center_crop" and img.width != img.height:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    elif opts.resize_mode == "border" and img.size != (opts.image_size, opts.image_size):
        side = max(opts.image_size, *img.size)
        canvas = Image.new("RGB", (side, side), (0, 0, 0))
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        img = canvas
    return img


def _encode(img: Image.Image, opts: ImageOptions) -> bytes:
    out = io.BytesIO()
    if opts.output_format == "jpg":
        img.save(out, format="JPEG", quality=opts.jpeg_quality)
    elif opts.output_format == "png":
        img.save(out, format="PNG")
    else:
        img.save(out, format="WEBP", quality=opts.jpeg_quality)
    return out.getvalue()


def _ext_of_format(fmt: str | None) -> str:
    return {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}.get(fmt or "", "jpg")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any mode (CMYK, 16-bit, palette, alpha) -> 8-bit RGB; alpha over white."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        # The scale comes from the mode (16-bit samples, as PNG stores them in
        # both I;16 and I), never from the observed peak: a dark image stays dark.
        arr = np.asarray(img, dtype=np.int64).clip(0, 65535)
        arr8 = ((arr * 255 + 32767) // 65535).astype("uint8")
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.split()[-1])
        return bg
    return img.convert("RGB")


# Let slightly short JPEGs from the web fail loudly rather than be padded grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
