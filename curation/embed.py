"""``webcurate embed``: L2-normalised image embeddings as the ``embeddings`` sidecar.

Ray Data pipeline, streaming:

1. ``from_items`` over the shards still to do;
2. ``_load_shard`` (CPU tasks): read one tar, decode + resize every image to
   ``image_size`` x ``image_size`` uint8, yield chunks; an undecodable image
   becomes a row with ``status="failed"`` and the reason, never an exception;
3. ``_Embedder`` (actor pool, ``num_gpus`` per actor when GPUs exist, CPU
   otherwise): normalise, forward, pool, L2-normalise;
4. the driver collects rows per shard and, as soon as a shard's rows are all
   in, writes ``<root>/embeddings/part-NNNNN.parquet`` atomically and records
   it in the manifest. A killed run keeps every finished part; a re-run with
   the same parameters skips them.

Part schema: ``key`` string, ``embedding`` fixed_size_list<float16|float32>[D]
(null when the sample failed), ``status`` ("ok" | "failed"), ``error``.
Rows are in tar order, so identical inputs give identical parts.
"""
from __future__ import annotations

import io
import logging
import time
import warnings
from typing import Any, Iterator

import numpy as np

from webcurate.shards.errors import ConfigError

from .backbones import BackboneSpec, build_backbone, pool_features, validate_spec

STAGE = "embeddings"
STATUS_OK = "ok"
STATUS_FAILED = "failed"
# Sentinel rows tell the driver about shards that yield no samples.
_EMPTY = "_empty_shard"
_SHARD_FAILED = "_shard_failed"
_LOAD_CHUNK = 256  # samples per block leaving the loader; bounds block size


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode image bytes to (size, size, 3) uint8: resize the short side, centre crop.

    JPEG ``draft`` mode lets libjpeg decode at a reduced scale first, which
    makes big photos cheap to embed at small sizes.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft("RGB", (size, size))
        im = im.convert("RGB")
        w, h = im.size
        if w < 1 or h < 1:
            raise ValueError(f"empty image {w}x{h}")
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.uint8)


def _load_shard(batch: dict[str, np.ndarray], root: str, image_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: one shard id in, chunks of decoded samples out.

    Output columns: key, shard, pos (tar order), n (samples in the shard),
    status, error, pixels (B, S, S, 3) uint8 (zeros where decoding failed).
    """
    from webcurate.shards.dataset import Dataset

    shard = int(batch["shard"][0])
    ds = Dataset(root)
    samples = None
    last: Exception | None = None
    for attempt in range(3):  # transient storage errors: retry the read, then report
        try:
            samples = list(ds.iter_samples(shard))
            break
        except Exception as e:
            last = e
            time.sleep(0.5 * (attempt + 1))
    if samples is None:
        yield _sentinel(shard, image_size, _SHARD_FAILED, f"{type(last).__name__}: {last}"[:500])
        return
    if not samples:
        yield _sentinel(shard, image_size, _EMPTY, "")
        return
    n = len(samples)
    for start in range(0, n, _LOAD_CHUNK):
        chunk = samples[start:start + _LOAD_CHUNK]
        pixels = np.zeros((len(chunk), image_size, image_size, 3), dtype=np.uint8)
        status, error = [], []
        for i, s in enumerate(chunk):
            try:
                pixels[i] = decode_image(s.image, image_size)
                status.append(STATUS_OK)
                error.append("")
            except Exception as e:  # any decoder failure is this sample's outcome
                status.append(STATUS_FAILED)
                error.append(f"decode: {type(e).__name__}: {e}"[:300])
        yield {
            "key": np.array([s.key for s in chunk], dtype=object),
            "shard": np.full(len(chunk), shard, dtype=np.int64),
            "pos": np.arange(start, start + len(chunk), dtype=np.int64),
            "n": np.full(len(chunk), n, dtype=np.int64),
            "status": np.array(status, dtype=object),
            "error": np.array(error, dtype=object),
            "pixels": pixels,
        }


def _sentinel(shard: int, image_size: int, status: str, error: str) -> dict[str, np.ndarray]:
    return {
        "key": np.array([""], dtype=object), "shard": np.array([shard], dtype=np.int64),
        "pos": np.array([-1], dtype=np.int64), "n": np.array([0], dtype=np.int64),
        "status": np.array([status], dtype=object), "error": np.array([error], dtype=object),
        "pixels": np.zeros((1, image_size, image_size, 3), dtype=np.uint8),
    }


class _Embedder:
    """Ray Data actor: holds one model, embeds batches of decoded pixels."""

    def __init__(self, spec: BackboneSpec, expected_sha256: str, threads: int):
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.model, info = build_backbone(spec)
        if info.weights_sha256 != expected_sha256:
            # Would silently mix two embedding spaces in one sidecar.
            raise RuntimeError(f"actor built weights {info.weights_sha256[:24]}, driver {expected_sha256[:24]}")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.mean = torch.tensor(info.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(info.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self.dim = info.dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """pixels (B, S, S, 3) uint8 -> embedding (B, D) float32, NaN rows where not embedded."""
        import torch

        status = batch["status"].copy()
        error = batch["error"].copy()
        ok = status == STATUS_OK
        emb = np.full((len(status), self.dim), np.nan, dtype=np.float32)
        if ok.any():
            x = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])).to(self.device)
            x = (x.permute(0, 3, 1, 2).float() - self.mean) / self.std
            with torch.inference_mode():
                if self.device.type == "cuda":
                    with torch.autocast("cuda", dtype=torch.float16):
                        feats = pool_features(self.model(x))
                else:
                    feats = pool_features(self.model(x))
                feats = torch.nn.functional.normalize(feats.float(), dim=1)
            out = feats.cpu().numpy()
            bad = ~np.isfinite(out).all(axis=1)
            emb[ok] = out
            idx = np.flatnonzero(ok)[bad]
            status[idx] = STATUS_FAILED
            error[idx] = "model: non-finite embedding"
            emb[idx] = np.nan
        return {k: batch[k] for k in ("key", "shard", "pos", "n")} | {
            "status": status, "error": error, "embedding": emb}


def part_table(rows: list[dict[str, Any]], dim: int, dtype: str):
    """Rows of one shard -> the sidecar part table (tar order)."""
    import pyarrow as pa

    rows = sorted(rows, key=lambda r: r["pos"])
    n = len(rows)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    mat = np.zeros((n, dim), dtype=np_dtype)
    valid = np.zeros(n, dtype=bool)
    for i, r in enumerate(rows):
        if r["status"] == STATUS_OK:
            mat[i] = r["embedding"]
            valid[i] = True
    values = pa.array(mat.reshape(-1), type=pa.float16() if dtype == "float16" else pa.float32())
    emb = pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~valid))
    return pa.table({
        "key": pa.array([r["key"] for r in rows], pa.string()),
        "embedding": emb,
        "status": pa.array([r["status"] for r in rows], pa.string()),
        "error": pa.array([r["error"] or None for r in rows], pa.string()),
    })


def _stats(rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    counts: dict[str, int] = {"total": len(rows), STATUS_OK: 0, STATUS_FAILED: 0}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        if r["status"] != STATUS_OK:
            reason = f"failed:{str(r['error']).split(':')[0]}"
            counts[reason] = counts.get(reason, 0) + 1
    return {"counts": counts, "seconds": round(seconds, 3)}


def run_embed(
    input: str,
    model: str,
    *,
    weights: str | None = None,
    checkpoint: str | None = None,
    random_init: bool = False,
    image_size: int = 224,
    batch_size: int = 64,
    num_gpus: float = 0.0,
    concurrency: int | None = None,
    dtype: str = "float16",
    summary: bool = True,
) -> dict[str, Any]:
    """Embed every sample of dataset ``input`` with timm architecture ``model``.

    Writes ``<input>/embeddings/part-NNNNN.parquet`` per shard (key,
    embedding (D,) L2-normalised, status, error) and records model name,
    weights sha256 and dim in the manifest's ``embeddings`` stage entry.
    Shards already embedded with the same parameters are skipped.
    ``num_gpus`` is per actor; ``concurrency`` is the number of actors
    (default: one per ``num_gpus`` share of the cluster's GPUs, else one per
    8 CPUs). Returns a summary dict (counts, shards done/skipped/failed, dim,
    images/s); raises StageError after recording the finished shards when
    some shards could not be read.
    """
    import ray

    from webcurate.shards.progress import print_summary, progress_bar
    from webcurate.shards.ray_runtime import cluster_cpus, cluster_gpus, init_ray, max_node_cpus
    from webcurate.shards.stage import StageResult, raise_if_failed
    from webcurate.shards import manifest as manifest_mod
    from webcurate.shards.dataset import Dataset

    if dtype not in ("float16", "float32"):
        raise ConfigError(f"--dtype must be float16 or float32, got {dtype!r}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    spec = BackboneSpec(model=model, weights=weights, checkpoint=checkpoint,
                        random_init=random_init, image_size=int(image_size))
    validate_spec(spec)
    dataset = Dataset(input)
    _ = dataset.manifest  # a clear error when input is not a dataset
    # Built once here: bad names / files fail before any Ray work starts.
    _, info = build_backbone(spec)
    for note in info.notes:
        warnings.warn(f"embed {model}: {note}", stacklevel=2)

    init_ray()
    # Ray Data's own progress bars / logs would interleave with our bar and summary.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data._internal.progress", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.ERROR)  # "progress bars disabled", "finished in Ns"
    if num_gpus > 0 and cluster_gpus() < num_gpus:
        warnings.warn(f"--num-gpus {num_gpus} asked for but the Ray cluster has {cluster_gpus():g} GPUs; "
                      "embedding on CPU", stacklevel=2)
        num_gpus = 0.0
    cpus = cluster_cpus()
    if concurrency is None:
        concurrency = max(1, int(cluster_gpus() // num_gpus)) if num_gpus > 0 else max(1, int(cpus // 8))
    if concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {concurrency}")
    # On CPU each actor gets its share of the cores (torch threads = that share).
    # ... but never more than one node has, or the actor could never be placed.
    actor_cpus = 1.0 if num_gpus > 0 else float(max(1, min(int(cpus // concurrency), int(max_node_cpus()))))

    image_size = info.image_size  # a checkpoint may fix its own input size
    parameters = {"model": info.model, "weights_sha256": info.weights_sha256, "weights_source": info.source,
                  "image_size": int(image_size), "dtype": dtype}
    manifest_mod.record_stage(dataset.root, STAGE, parameters, **info.as_dict(), dtype=dtype)
    dataset.reload()
    shards = dataset.completed_shards()
    done_before = set(dataset.sidecar_completed(STAGE))
    todo = [s for s in shards if s not in done_before]
    result = StageResult(stage=STAGE, skipped=[s for s in shards if s in done_before])

    t0 = time.time()
    if todo:
        ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
        # On GPU, loading runs as separate 1-CPU tasks feeding the GPU actors. On CPU the
        # loader asks for the same CPUs as the actors so Ray Data fuses it into them: the
        # actors then own their cores (decode, then forward) and never wait for a CPU a
        # loader task holds.
        ds = ds.map_batches(_load_shard, batch_size=1, batch_format="numpy",
                            num_cpus=1 if num_gpus > 0 else actor_cpus,
                            fn_kwargs={"root": dataset.root, "image_size": int(image_size)})
        ds = ds.map_batches(
            _Embedder, batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_cpus=actor_cpus, num_gpus=num_gpus if num_gpus > 0 else None,
            fn_constructor_kwargs={"spec": spec, "expected_sha256": info.weights_sha256,
                                   "threads": int(actor_cpus) if num_gpus <= 0 else 0},
        )
        pending: dict[int, list[dict[str, Any]]] = {}
        started: dict[int, float] = {}
        bar = progress_bar(total=len(shards), initial=len(result.skipped), desc="embed", unit="shard")
        images = 0
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for i in range(len(batch["key"])):
                    shard = int(batch["shard"][i])
                    status = str(batch["status"][i])
                    if status == _SHARD_FAILED:
                        result.failed[shard] = str(batch["error"][i])
                        bar.update(1)
                        continue
                    rows = pending.setdefault(shard, [])
                    started.setdefault(shard, time.time())
                    if status != _EMPTY:
                        rows.append({"key": str(batch["key"][i]), "pos": int(batch["pos"][i]),
                                     "status": status, "error": str(batch["error"][i]),
                                     "embedding": batch["embedding"][i]})
                    if status == _EMPTY or len(rows) == int(batch["n"][i]):
                        rows = pending.pop(shard)
                        dataset.write_sidecar(STAGE, shard, part_table(rows, info.dim, dtype))
                        stats = _stats(rows, time.time() - started.pop(shard))
                        manifest_mod.record_shard(dataset.root, shard, stats, stage=STAGE)
                        result.done[shard] = stats
                        images += len(rows)
                        bar.set_postfix_str(f"{images} images, {images / max(time.time() - t0, 1e-6):.1f}/s")
                        bar.update(1)
        except Exception as e:
            # A failure of the pipeline itself (e.g. an actor could not start):
            # every part written so far is recorded; report the rest as failed.
            for s in todo:
                if s not in result.done and s not in result.failed:
                    result.failed[s] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:500]
        finally:
            bar.close()
        for s in pending:  # a shard whose rows stopped arriving (should not happen)
            result.failed.setdefault(s, f"only {len(pending[s])} samples embedded")
    result.seconds = time.time() - t0
    manifest_mod.record_stage(dataset.root, STAGE, parameters, finished=manifest_mod.now_iso())
    dataset.reload()
    if summary:
        print_summary(result, title=f"embed {info.model} ({info.dim}-d, {info.source}): {dataset.root}")
    raise_if_failed(result)
    counts = result.counts
    return {
        "stage": STAGE, "root": dataset.root, "model": info.model, "dim": info.dim,
        "weights_sha256": info.weights_sha256, "weights_source": info.source, "dtype": dtype,
        "counts": counts, "shards_done": sorted(result.done), "shards_skipped": sorted(result.skipped),
        "shards_failed": dict(result.failed), "seconds": round(result.seconds, 3),
        "images_per_s": round(counts.get("total", 0) / result.seconds, 2) if result.seconds > 0 else None,
    }
