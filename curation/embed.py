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
from webcurate.shards.stage import StageResult

from .embedding_parts import degenerate_rows

from .embedding_models import BackboneInfo, BackboneSpec, build_backbone, pool_features
from .stage_params import EmbedParams

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
            emb[ok] = out
            for bad, why in ((~np.isfinite(out).all(axis=1), "model: non-finite embedding"),
                             (degenerate_rows(np.nan_to_num(out)), "model: degenerate embedding (zero or constant)")):
                idx = np.flatnonzero(ok)[bad]
                status[idx] = STATUS_FAILED
                error[idx] = np.where(error[idx] == "", why, error[idx])
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


def _quiet_ray_data() -> None:
    """Ray Data's own progress bars / logs would interleave with our bar and summary."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data._internal.progress", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.ERROR)  # "progress bars disabled", "finished in Ns"


def actors(params: EmbedParams) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) for this cluster.

    On CPU each actor gets its share of the cores (torch threads = that share),
    but never more than one node has, or the actor could never be placed.
    """
    from webcurate.shards.ray_runtime import cluster_cpus, cluster_gpus, max_node_cpus

    gpus = params.num_gpus
    if gpus > 0 and cluster_gpus() < gpus:
        warnings.warn(f"--num-gpus {gpus} asked for but the Ray cluster has {cluster_gpus():g} GPUs; "
                      "embedding on CPU", stacklevel=3)
        gpus = 0.0
    cpus = cluster_cpus()
    n = params.concurrency or (max(1, int(cluster_gpus() // gpus)) if gpus > 0 else max(1, int(cpus // 8)))
    per = 1.0 if gpus > 0 else float(max(1, min(int(cpus // n), int(max_node_cpus()))))
    return n, per, gpus


def embed_shards(root: str, todo: list[int], spec: BackboneSpec, info: BackboneInfo, params: EmbedParams,
                 result: StageResult, total: int) -> None:
    """Embed ``todo`` shards through Ray Data; write and record each part as its rows are all in."""
    import ray

    from webcurate.shards import manifest as manifest_mod
    from webcurate.shards.dataset import Dataset
    from webcurate.shards.progress import progress_bar

    n, cpus, gpus = actors(params)
    ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
    # On GPU, loading runs as separate 1-CPU tasks feeding the GPU actors. On CPU the loader
    # asks for the same CPUs as the actors so Ray Data fuses it into them: the actors then own
    # their cores (decode, then forward) and never wait for a CPU a loader task holds.
    ds = ds.map_batches(_load_shard, batch_size=1, batch_format="numpy", num_cpus=1 if gpus > 0 else cpus,
                        fn_kwargs={"root": root, "image_size": int(info.image_size)})
    ds = ds.map_batches(_Embedder, batch_size=params.batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=n), num_cpus=cpus, num_gpus=gpus or None,
                        fn_constructor_kwargs={"spec": spec, "expected_sha256": info.weights_sha256,
                                               "threads": int(cpus) if gpus <= 0 else 0})
    dataset = Dataset(root)
    pending: dict[int, list[dict[str, Any]]] = {}
    started: dict[int, float] = {}
    bar = progress_bar(total=total, initial=len(result.skipped), desc="embed", unit="shard")
    t0, images = time.time(), 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["key"])):
                shard, status = int(batch["shard"][i]), str(batch["status"][i])
                if status == _SHARD_FAILED:
                    result.failed[shard] = str(batch["error"][i])
                    bar.update(1)
                    continue
                rows = pending.setdefault(shard, [])
                started.setdefault(shard, time.time())
                if status != _EMPTY:
                    rows.append({"key": str(batch["key"][i]), "pos": int(batch["pos"][i]), "status": status,
                                 "error": str(batch["error"][i]), "embedding": batch["embedding"][i]})
                if status == _EMPTY or len(rows) == int(batch["n"][i]):
                    rows = pending.pop(shard)
                    dataset.write_sidecar(STAGE, shard, part_table(rows, info.dim, params.dtype))
                    stats = _stats(rows, time.time() - started.pop(shard))
                    manifest_mod.record_shard(root, shard, stats, stage=STAGE)
                    result.done[shard] = stats
                    images += len(rows)
                    bar.set_postfix_str(f"{images} images, {images / max(time.time() - t0, 1e-6):.1f}/s")
                    bar.update(1)
    except Exception as e:
        # A failure of the pipeline itself (e.g. an actor could not start): every part
        # written so far is recorded; report the rest as failed.
        text = str(e).strip().splitlines()
        for s in todo:
            if s not in result.done and s not in result.failed:
                result.failed[s] = f"{type(e).__name__}: {text[-1] if text else ''}"[:500]
    finally:
        bar.close()
    for s in pending:  # a shard whose rows stopped arriving (should not happen)
        result.failed.setdefault(s, f"only {len(pending[s])} samples embedded")


def run_embed(input: str, model: str | None = None, *, summary: bool = True, **options: Any) -> StageResult:
    """Embed every sample of dataset ``input`` with timm architecture ``model``; ``options`` are ``EmbedParams``.

    Writes ``<input>/embeddings/part-NNNNN.parquet`` per shard (key,
    embedding (D,) L2-normalised, status, error) and records model name,
    weights sha256, dim and image size in the stage record, then the
    embedding health (``embedding_health.health``: do the vectors separate
    images?) and the copy-threshold calibration on augmented copies of the
    pool (``embedding_health.calibrate``). Shards already embedded with the
    same parameters are skipped. Raises StageError after recording the
    finished shards when some shards could not be read.
    """
    from webcurate.shards.dataset import Dataset
    from webcurate.shards.global_stage import GlobalStage
    from webcurate.shards.params import parse
    from webcurate.shards.ray_runtime import init_ray

    from . import embedding_health

    if model is not None:
        options["model"] = model
    params = parse(EmbedParams, options, "embed")
    spec = BackboneSpec(model=params.model, weights=params.weights, checkpoint=params.checkpoint,
                        random_init=params.random_init, image_size=params.image_size)
    dataset = Dataset(input)
    _ = dataset.manifest  # a clear error when input is not a dataset
    _, info = build_backbone(spec)  # bad names / files fail before any Ray work starts
    for note in info.notes:
        warnings.warn(f"embed {params.model}: {note}", stacklevel=2)
    init_ray()
    _quiet_ray_data()
    parameters = {"model": info.model, "weights_sha256": info.weights_sha256, "weights_source": info.source,
                  "image_size": int(info.image_size), "dtype": params.dtype}
    stage = GlobalStage(dataset, STAGE, parameters, command="embed")
    stage.start(**info.as_dict(), dtype=params.dtype)
    todo = stage.todo()
    result = StageResult(stage=STAGE, root=dataset.root, skipped=[s for s in stage.shards if s not in todo])
    if todo:
        embed_shards(dataset.root, todo, spec, info, params, result, len(stage.shards))
    extra: dict[str, Any] = {}
    entry = manifest_info(dataset.root)
    if not result.failed and (result.done or "health" not in entry):
        extra["health"] = embedding_health.health(dataset.root, stage.shards, info.dim)
    if not result.failed and params.calibration_samples and (result.done or "calibration" not in entry):
        extra["calibration"] = embedding_health.calibrate(dataset.root, stage.shards, spec, info,
                                                          params.calibration_samples, extra.get("health"))
    title = f"embed {info.model} ({info.dim}-d, {info.source}): {dataset.root}"
    result = stage.finish(result, summary=summary, title=title, **extra)
    result.info.update(info.as_dict(), dtype=params.dtype)
    for part in ("health", "calibration"):
        found = extra.get(part) or entry.get(part) or {}
        if found.get("warning"):
            result.warnings.append(found["warning"])
            print(f"warning: {found['warning']}")
    return result


def manifest_info(root: str) -> dict[str, Any]:
    """The embeddings stage entry of ``root`` (health, calibration, model, ...)."""
    from webcurate.shards.dataset import Dataset

    return dict(Dataset(root).manifest.get("stages", {}).get(STAGE, {}))
