"""Pixel copy descriptors: the ``pixels`` sidecar that copy-dedup searches besides the embeddings.

Why: a backbone that was not trained for copy detection (any of ours on a
small budget) puts near-copies and same-class photos at similar cosines, so
no embedding threshold is both precise and complete (bench/results/
curation_dedup.md: precision 0.13 at recall 0.87 on CIFAR-10 copies). Raw
pixels find re-encodes and resizes almost without false pairs but miss crops,
because a crop is a zoom of its original. So every image gets ``Z`` views:
its centre square and centre crops zoomed in by ``zooms`` (default 1, 0.9,
0.81, 0.73, 0.66), each ``side`` x ``side`` RGB, mean-removed and
L2-normalised. Copy-dedup searches every view against every view (a crop's
whole view meets its original's zoomed view)
and joins two images when any pair of their views exceeds
``--pixel-threshold`` (``dedup_graph`` with ``views=Z``).

Part schema: the embeddings part schema (``key``, ``embedding``
fixed_size_list<float16>[Z * side * side * 3], views concatenated,
``status``, ``error``), in index order; an undecodable image is a failed row
with its reason. Parameters are recorded with the stage: other ``side`` or
``zooms`` recompute every part, a re-run with the same ones skips them.
"""
from __future__ import annotations

import io
import time
from typing import Any

import numpy as np

STAGE = "pixels"
STATUS_OK = "ok"
STATUS_FAILED = "failed"
DEFAULT_SIDE = 16
# A geometric ladder (step 0.9): any crop keeping 0.62-1 of the side is within 5 % of the zoom ratio
# between two views (0.9 ** k), where the first ladder (1, 0.875, 0.75) left gaps of 7 % that cost crop
# recall (bench/results/curation_dedup.md).
DEFAULT_ZOOMS = (1.0, 0.9, 0.81, 0.73, 0.66)


def views(data: bytes, side: int = DEFAULT_SIDE, zooms: tuple[float, ...] = DEFAULT_ZOOMS) -> np.ndarray:
    """(Z, side * side * 3) float32 views of one encoded image, each mean-removed and L2-normalised.

    View ``v`` is the centre crop of the image's centre square covering
    ``zooms[v]`` of its side, box-filtered to ``side`` x ``side``. A flat view
    (a blank image) stays all zeros: it counts as a missing descriptor.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft("RGB", (4 * side, 4 * side))  # decode at a reduced scale: only a thumbnail is needed
        im = im.convert("RGB")
        w, h = im.size
        if w < 1 or h < 1:
            raise ValueError(f"empty image {w}x{h}")
        s = min(w, h)
        out = np.empty((len(zooms), side * side * 3), np.float32)
        for i, z in enumerate(zooms):
            c = s * z
            box = ((w - c) / 2, (h - c) / 2, (w + c) / 2, (h + c) / 2)
            v = np.asarray(im.resize((side, side), Image.BOX, box=box), np.float32).reshape(-1)
            out[i] = v - v.mean()
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(norm > 1e-3, out / np.maximum(norm, 1e-3), 0.0).astype(np.float32)


def _table(keys: list[str], mat: np.ndarray, status: list[str], error: list[str | None]):
    import pyarrow as pa

    values = pa.array(mat.astype(np.float16).reshape(-1), type=pa.float16())
    emb = pa.FixedSizeListArray.from_arrays(values, mat.shape[1],
                                            mask=pa.array(np.array(status, dtype=object) != STATUS_OK))
    return pa.table({"key": pa.array(keys, pa.string()), "embedding": emb,
                     "status": pa.array(status, pa.string()), "error": pa.array(error, pa.string())})


def pixels_shard(shard: int, root: str, side: int, zooms: list[float]) -> dict[str, Any]:
    """Ray task: the views of every ``ok`` sample of one shard, written as its ``pixels`` part."""
    from webcurate.shards.dataset import Dataset

    from .embedding_parts import read_index_part

    t0 = time.time()
    ds = Dataset(root)
    keys = read_index_part(root, shard).keys
    images = {s.key: s.image for s in ds.iter_samples(shard, keys=keys)}
    dim = len(zooms) * side * side * 3
    mat = np.zeros((len(keys), dim), np.float32)
    status, error = [], []
    for i, key in enumerate(keys):
        try:
            if key not in images:
                raise LookupError("no image in the shard's tar")
            mat[i] = views(images[key], side, tuple(zooms)).reshape(-1)
            status.append(STATUS_OK)
            error.append(None)
        except Exception as e:  # any decoder failure is this sample's outcome, not the shard's
            status.append(STATUS_FAILED)
            error.append(f"decode: {type(e).__name__}: {e}"[:300])
    ds.write_sidecar(STAGE, shard, _table(keys, mat, status, error))
    counts = {"total": len(keys), STATUS_OK: status.count(STATUS_OK), STATUS_FAILED: status.count(STATUS_FAILED)}
    return {"counts": counts, "seconds": round(time.time() - t0, 3)}


def run_pixels(input: str, *, side: int = DEFAULT_SIDE, zooms: tuple[float, ...] = DEFAULT_ZOOMS,
               summary: bool = False) -> dict[str, Any]:
    """Compute the ``pixels`` sidecar of dataset ``input`` (parts complete with these parameters are skipped).

    Returns ``{"counts", "shards_done", "shards_skipped", "seconds", "views", "dim"}``
    (``dim`` = side * side * 3 per view); raises StageError after recording the
    finished parts when some shards failed.
    """
    from webcurate.shards.dataset import Dataset
    from webcurate.shards.stage import run_sidecar_stage

    ds = Dataset(input)
    params = {"side": int(side), "zooms": [float(z) for z in zooms]}
    res = run_sidecar_stage(ds, STAGE, pixels_shard, params, kwargs=params, summary=summary)
    return {"counts": dict(res.totals), "shards_done": sorted(res.done), "shards_skipped": sorted(res.skipped),
            "seconds": round(res.seconds, 2), "views": len(zooms), "dim": int(side) * int(side) * 3}
