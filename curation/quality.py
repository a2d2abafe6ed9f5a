"""The ``quality`` sidecar: per-image scores computed once, thresholded by ``webcurate filter``.

One Ray task per shard (``shards/stage.run_sidecar_stage``) decodes every
``ok`` sample of the index once and writes ``<root>/quality/part-N.parquet``;
changing a filter threshold later never decodes an image again. The scores
are the ones fastdup / cleanvision users know, each a plain number so the
report can show its histogram:

=============  ==========================================================  ==============
column         what it measures                                            filter
=============  ==========================================================  ==============
brightness     mean luma, 0..255                                           dark / bright
contrast       standard deviation of luma                                  blank
entropy        Shannon entropy of the 256-bin luma histogram, bits (0..8)  low_information
blur           variance of the Laplacian of luma (low = blurry)            blurry
noise          1 - lag-1 autocorrelation of luma (~0.1 photos, ~1 noise)   noise
colorfulness   mean over pixels of max - min channel, 0..255               grayscale
blockiness     gradient across 8x8 JPEG block edges / inside blocks        jpeg_artefacts
upscale        largest factor (2..8) the image survives down-and-up        upscaled
               sampling with < 10 % relative error: 1 = native detail
width/height   the stored image; original_* from the index when present    small / aspect
caption_*      length, junk rule and hash of the caption (captions.py)     caption rules
=============  ==========================================================  ==============

Luma statistics are taken on the image reduced to fit 256 x 256 (never
enlarged), so scores compare across image sizes; blockiness and upscale look
at pixel-level structure and use a centre crop of at most 512 x 512 at full
resolution instead. An image that does not decode is a row with
``status="failed"`` and the reason; its scores are null.
"""
from __future__ import annotations

import io
import time
from typing import Any

import numpy as np

from webcurate.shards.params import Params

from .captions import caption_features

STAGE = "quality"
STATUS_OK = "ok"
STATUS_FAILED = "failed"
ANALYSIS_SIZE = 256
CROP_SIZE = 512
UPSCALE_FACTORS = (2, 3, 4, 6, 8)
UPSCALE_TOL = 0.10
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

SCORE_COLUMNS = ("brightness", "contrast", "entropy", "blur", "noise", "colorfulness", "blockiness", "upscale")


class QualityParams(Params):
    """The quality stage has no knobs yet; recorded so a future one restarts completion."""

    version: int = 1


def _schema():
    import pyarrow as pa

    return pa.schema(
        [pa.field("key", pa.string()), pa.field("status", pa.string()), pa.field("error", pa.string()),
         pa.field("width", pa.int32()), pa.field("height", pa.int32()),
         pa.field("original_width", pa.int32()), pa.field("original_height", pa.int32())]
        + [pa.field(c, pa.float32()) for c in SCORE_COLUMNS]
        + [pa.field("caption_chars", pa.int32()), pa.field("caption_words", pa.int32()),
           pa.field("caption_junk", pa.string()), pa.field("caption_hash", pa.int64())])


def rows_table(rows: list[dict[str, Any]]):
    """Quality rows (dicts with the part's columns; missing ones null) -> the part table, fixed schema."""
    import pyarrow as pa

    schema = _schema()
    return pa.table({f.name: pa.array([r.get(f.name) for r in rows], f.type) for f in schema}, schema=schema)


def _blockiness(gray: np.ndarray) -> float:
    """Mean |gradient| across 8-pixel block boundaries over the mean inside blocks (1 = no grid)."""
    ratios = []
    for axis in (1, 0):
        d = np.abs(np.diff(gray, axis=axis))
        n = d.shape[axis]
        edge = (np.arange(n) % 8) == 7
        if n < 16 or not edge.any():
            continue
        on = d.take(np.flatnonzero(edge), axis=axis).mean()
        off = d.take(np.flatnonzero(~edge), axis=axis).mean()
        ratios.append((on + 1e-3) / (off + 1e-3))
    return float(np.mean(ratios)) if ratios else 1.0


def _upscale(gray: np.ndarray) -> float:
    """Largest factor f whose box-down / bicubic-up round trip changes the image by < UPSCALE_TOL of its std."""
    from PIL import Image

    h, w = gray.shape
    sd = max(float(gray.std()), 1.0)
    im = Image.fromarray(gray)
    best = 1.0
    for f in UPSCALE_FACTORS:
        if min(w, h) // f < 4:
            break
        back = im.resize((w // f, h // f), Image.BOX).resize((w, h), Image.BICUBIC)
        err = float(np.sqrt(np.mean((np.asarray(back, dtype=np.float32) - gray) ** 2))) / sd
        if err < UPSCALE_TOL:
            best = float(f)
    return best


def image_scores(data: bytes) -> dict[str, Any]:
    """Decode ``data`` and score it: width, height and every ``SCORE_COLUMNS`` entry (floats).

    Raises whatever the decoder raises for a file that is not an image.
    """
    from PIL import Image
    from scipy import ndimage, stats

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
    w, h = im.size
    if w < 1 or h < 1:
        raise ValueError(f"empty image {w}x{h}")
    small = im
    if max(w, h) > ANALYSIS_SIZE:
        small = im.copy()
        small.thumbnail((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.BILINEAR)
    rgb = np.asarray(small, dtype=np.float32)
    luma = rgb @ _LUMA
    hist = np.bincount(np.clip(luma, 0, 255).astype(np.uint8).ravel(), minlength=256)
    left, right = luma[:, :-1].ravel(), luma[:, 1:].ravel()
    if left.size > 1 and left.std() > 1e-3 and right.std() > 1e-3:
        noise = 1.0 - float(np.corrcoef(left, right)[0, 1])
    else:
        noise = 0.0  # constant rows: no noise (the blank filter catches these)
    # Pixel-level structure: full resolution, centre crop aligned to the 8x8 JPEG grid.
    cw, ch = min(w, CROP_SIZE), min(h, CROP_SIZE)
    x0, y0 = ((w - cw) // 2) // 8 * 8, ((h - ch) // 2) // 8 * 8
    gray = np.asarray(im.convert("L").crop((x0, y0, x0 + cw, y0 + ch)), dtype=np.float32)
    return {
        "width": w, "height": h,
        "brightness": float(luma.mean()), "contrast": float(luma.std()),
        "entropy": float(stats.entropy(hist, base=2)),
        "blur": float(ndimage.laplace(luma).var()),
        "noise": noise,
        "colorfulness": float((rgb.max(axis=2) - rgb.min(axis=2)).mean()),
        "blockiness": _blockiness(gray),
        "upscale": _upscale(gray),
    }


def _null_scores() -> dict[str, Any]:
    return {"width": None, "height": None, **{c: None for c in SCORE_COLUMNS}}


def quality_shard(shard: int, root: str) -> dict[str, Any]:
    """Ray task: score every ``ok`` sample of one shard and write its ``quality`` part (index order)."""
    from webcurate.shards.dataset import Dataset

    t0 = time.time()
    ds = Dataset(root)
    index = ds.read_index(shard)
    cols = set(index.column_names)
    index = index.filter(np.asarray(index["status"].to_pylist(), dtype=object) == STATUS_OK)

    def col(name: str) -> list[Any]:
        return index[name].to_pylist() if name in cols else [None] * index.num_rows

    keys = col("key")
    images: dict[str, Any] = {}
    for s in ds.iter_samples(shard, keys=keys):
        images[s.key] = s
    rows: list[dict[str, Any]] = []
    counts = {"total": 0, STATUS_OK: 0, STATUS_FAILED: 0}
    for key, cap, ow, oh in zip(keys, col("caption"), col("original_width"), col("original_height")):
        sample = images.get(key)
        row: dict[str, Any] = {"key": key, "status": STATUS_OK, "error": None,
                               "original_width": ow, "original_height": oh}
        caption = cap if cap is not None else (sample.caption if sample is not None else None)
        row.update(caption_features(caption))
        if sample is None:
            row.update(_null_scores(), status=STATUS_FAILED, error="missing: no image in the shard's tar")
        else:
            try:
                row.update(image_scores(sample.image))
            except Exception as e:  # any decoder failure is this sample's outcome, not the shard's
                row.update(_null_scores(), status=STATUS_FAILED, error=f"decode: {type(e).__name__}: {e}"[:300])
        counts["total"] += 1
        counts[row["status"]] += 1
        rows.append(row)
    ds.write_sidecar(STAGE, shard, rows_table(rows))
    return {"counts": counts, "seconds": round(time.time() - t0, 3)}


def run_quality(input: str, *, workers: int | None = None, summary: bool = True) -> dict[str, Any]:
    """Compute the ``quality`` sidecar of dataset ``input`` (skips parts already complete).

    Returns ``{"counts": {...}, "shards_done": [...], "shards_skipped": [...], "seconds"}``;
    raises StageError after recording the finished parts when some shards failed.
    """
    from webcurate.shards.dataset import Dataset
    from webcurate.shards.stage import run_sidecar_stage

    ds = Dataset(input)
    _ = ds.manifest  # a clear error when input is not a dataset
    res = run_sidecar_stage(ds, STAGE, quality_shard, QualityParams().as_record(), workers=workers,
                            summary=summary)
    return {"counts": dict(res.totals), "shards_done": sorted(res.done), "shards_skipped": sorted(res.skipped),
            "seconds": round(res.seconds, 2)}
