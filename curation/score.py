"""``webcurate score``: a score per sample from a model the user brings (aesthetic, NSFW, watermark…).

Three ways to score, each from local (or ``s3://``) weight files, never a hub:

- ``--model NAME --weights FILE``: a timm classifier; its logits (B, C);
- ``--model NAME --weights FILE --head HEAD``: the model's pooled features
  (B, D) through a linear head; ``--checkpoint`` (our own training) works in
  place of ``--weights`` here;
- ``--head HEAD`` alone: the linear head on the dataset's own ``embeddings``
  sidecar (no image is decoded).

A head file (safetensors or a torch state dict) holds one 2-D tensor
``weight`` (C, D) and optionally ``bias`` (C,) (prefixes such as ``head.``
are fine). Outputs go through ``activation`` (auto = sigmoid for one output,
softmax for several) and ``output`` picks the score column. The result is
the ``score_<name>`` sidecar: ``key``, ``status``, ``error``, ``score``
(float32, null when the sample could not be scored) and ``outputs`` (all C
activations when C <= 64). ``webcurate filter --min-score NAME=V`` and
``webcurate sample --min-score / --weight-by`` read it.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from webcurate.shards.errors import ConfigError

from .quality_params import ScoreParams, score_stage

MAX_OUTPUT_COLUMNS = 64
_MODELS: dict[str, Any] = {}  # per worker process: one model per weights hash, built once


# -- weights --------------------------------------------------------------------------------

def load_head(path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(weight (C, D) float32, bias (C,) float32, sha256) of a linear head file."""
    from .embedding_models import _local_copy, file_sha256, load_state_dict_file

    local, tmp = _local_copy(path, "head file")
    try:
        sha, state = file_sha256(local), load_state_dict_file(local)
    finally:
        if tmp:
            os.unlink(local)
    mats = {k: v for k, v in state.items() if v.ndim == 2}
    vecs = {k: v for k, v in state.items() if v.ndim == 1}
    if len(mats) != 1:
        raise ConfigError(f"head file {path} must hold exactly one 2-D weight (C, D); found "
                          f"{', '.join(f'{k} {tuple(v.shape)}' for k, v in mats.items()) or 'none'}")
    wname, w = next(iter(mats.items()))
    bname = wname[:-len("weight")] + "bias" if wname.endswith("weight") else None
    b = vecs.get(bname) if bname else None
    if b is None and len(vecs) == 1:
        b = next(iter(vecs.values()))
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ConfigError(f"head file {path}: bias {tuple(b.shape)} does not match weight {tuple(w.shape)}")
    w_np = w.float().numpy()
    b_np = np.zeros(w.shape[0], np.float32) if b is None else b.float().numpy()
    return w_np, b_np, sha


def _classifier_width(model_name: str, state: dict[str, Any], image_size: int) -> int:
    """C of a timm classifier's weights file, from its classifier tensor."""
    from .embedding_models import create_timm_model

    probe = create_timm_model(model_name, image_size)  # num_classes=0: only the names matter here
    cls = str(getattr(probe, "pretrained_cfg", {}).get("classifier") or "head")
    w = state.get(f"{cls}.weight")
    if w is None or w.ndim != 2:
        raise ConfigError(f"weights file for {model_name} has no classifier tensor `{cls}.weight`: it is a "
                          "backbone, not a classifier; add --head FILE with a linear head for its features")
    return int(w.shape[0])


def build_model(p: ScoreParams) -> tuple[Any, dict[str, Any]]:
    """The image model of ``p`` in eval mode: (model: (B,3,S,S) -> (B, C or D), info).

    ``info``: mean, std, sha256, outputs (C when the model is a classifier,
    else the feature width D the head must take).
    """
    import timm
    import torch

    from .embedding_models import (BackboneSpec, _local_copy, build_backbone, file_sha256, load_state_dict_file,
                            _norm_stats)

    if p.head:  # a backbone: features into the head
        model, binfo = build_backbone(BackboneSpec(model=p.model, weights=p.weights, checkpoint=p.checkpoint,
                                                   image_size=p.image_size))
        return model, {"mean": binfo.mean, "std": binfo.std, "sha256": binfo.weights_sha256, "width": binfo.dim,
                       "image_size": binfo.image_size, "classifier": False}
    local, tmp = _local_copy(p.weights, "weights file")
    try:
        sha, state = file_sha256(local), load_state_dict_file(local)
    finally:
        if tmp:
            os.unlink(local)
    width = _classifier_width(p.model, state, p.image_size)
    try:
        model = timm.create_model(p.model, pretrained=False, num_classes=width, img_size=p.image_size)
    except TypeError:
        model = timm.create_model(p.model, pretrained=False, num_classes=width)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    if wrong or missing:
        raise ConfigError(f"weights file {p.weights} does not fit timm classifier {p.model}: {len(missing)} tensors "
                          f"missing (e.g. {', '.join(missing[:3]) or '-'}), {len(wrong)} mis-shaped "
                          f"(e.g. {', '.join(wrong[:2]) or '-'})")
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in state.items() if k in own})
    model.eval()
    mean, std = _norm_stats(model)
    return model, {"mean": mean, "std": std, "sha256": sha, "width": width, "image_size": p.image_size,
                   "classifier": True}


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    """(N, C) raw outputs -> (N, C) scores: raw, sigmoid, or softmax over C (auto picks by C)."""
    from scipy.special import expit, softmax

    if activation == "auto":
        activation = "sigmoid" if logits.shape[1] == 1 else "softmax"
    if activation == "sigmoid":
        return expit(logits)
    if activation == "softmax":
        return softmax(logits, axis=1)
    return logits


def check_widths(p: ScoreParams, head: tuple[np.ndarray, np.ndarray, str] | None, width: int, source: str) -> int:
    """The number of outputs C, after checking the head takes ``width`` inputs and ``output`` exists."""
    outputs = width
    if head is not None:
        w = head[0]
        if w.shape[1] != width:
            raise ConfigError(f"--head {p.head} takes {w.shape[1]}-d inputs (weight {tuple(w.shape)}) but {source} "
                              f"gives {width}-d features; use the head trained for this model")
        outputs = int(w.shape[0])
    if not -outputs <= p.output < outputs:
        raise ConfigError(f"--output {p.output} is out of range: the score model has {outputs} output(s)")
    if p.activation == "softmax" and outputs < 2:
        raise ConfigError("--activation softmax needs at least 2 outputs; this score model has 1 (use sigmoid)")
    return outputs


# -- per-shard tasks ------------------------------------------------------------------------

def _part(keys: list[str], status: list[str], error: list[str | None], out: np.ndarray, output: int):
    """The ``score_<name>`` part: out (N, C) activations, NaN rows where not scored."""
    import pyarrow as pa

    ok = np.isfinite(out).all(axis=1) if out.size else np.zeros(len(keys), bool)
    status = [s if (s != "ok" or o) else "failed" for s, o in zip(status, ok)]
    error = [e if (s != "failed" or e) else "model: non-finite output" for s, e in zip(status, error)]
    cols = {"key": pa.array(keys, pa.string()), "status": pa.array(status, pa.string()),
            "error": pa.array(error, pa.string()),
            "score": pa.array(out[:, output].astype(np.float32) if out.size else np.zeros(len(keys), np.float32),
                              pa.float32(), mask=~ok)}
    if out.shape[1] <= MAX_OUTPUT_COLUMNS:
        flat = pa.array(np.nan_to_num(out).astype(np.float32).reshape(-1), pa.float32())
        cols["outputs"] = pa.FixedSizeListArray.from_arrays(flat, out.shape[1], mask=pa.array(~ok))
    return pa.table(cols), {"counts": {"total": len(keys), "ok": int(ok.sum()), "failed": int((~ok).sum())}}


def score_embeddings_shard(shard: int, root: str, stage: str, weight: np.ndarray, bias: np.ndarray,
                           activation: str, output: int) -> dict[str, Any]:
    """Ray task: the linear head over one shard's ``embeddings`` part: (N, D) @ (D, C) + (C,)."""
    from webcurate.shards.dataset import Dataset

    ds = Dataset(root)
    t = ds.read_sidecar_part("embeddings", shard, columns=["key", "embedding", "status"])
    n, d = t.num_rows, weight.shape[1]
    x = np.full((n, d), np.nan, np.float32)
    valid = t["embedding"].is_valid().to_numpy(zero_copy_only=False)
    if valid.any():
        flat = t["embedding"].filter(t["embedding"].is_valid()).combine_chunks().flatten()
        x[valid] = np.asarray(flat.to_numpy(zero_copy_only=False), np.float32).reshape(-1, d)
    status = ["ok" if v and s == "ok" else "failed" for v, s in zip(valid, t["status"].to_pylist())]
    error = [None if s == "ok" else "no embedding" for s in status]
    x[np.asarray(status) != "ok"] = np.nan
    table, stats = _part(t["key"].to_pylist(), status, error, activate(x @ weight.T + bias, activation), output)
    ds.write_sidecar(stage, shard, table)
    return stats


def _model(params: dict[str, Any], sha: str):
    key = f"{sha}:{params.get('image_size')}:{params.get('head') is not None}"
    if key not in _MODELS:
        _MODELS.clear()  # one model per worker process at a time
        _MODELS[key] = build_model(ScoreParams.model_validate(params))
    return _MODELS[key]


def score_images_shard(shard: int, root: str, stage: str, params: dict[str, Any], sha: str,
                       weight: np.ndarray | None, bias: np.ndarray | None) -> dict[str, Any]:
    """Ray task: decode one shard's ``ok`` samples, forward (B, 3, S, S) through the model (and head)."""
    import torch

    from webcurate.shards.dataset import Dataset

    from .embed import decode_image
    from .embedding_models import pool_features

    torch.set_num_threads(1)
    p = ScoreParams.model_validate(params)
    model, info = _model(params, sha)
    size = int(info["image_size"])
    mean = torch.tensor(info["mean"]).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(info["std"]).view(1, 3, 1, 1) * 255.0
    ds = Dataset(root)
    idx = ds.read_index(shard, columns=["key", "status"])
    keys = [k for k, s in zip(idx["key"].to_pylist(), idx["status"].to_pylist()) if s == "ok"]
    pixels: dict[str, np.ndarray] = {}
    errors: dict[str, str] = {}
    for s in ds.iter_samples(shard, keys=keys):
        try:
            pixels[s.key] = decode_image(s.image, size)
        except Exception as e:  # this sample's outcome, not the shard's
            errors[s.key] = f"decode: {type(e).__name__}: {e}"[:300]
    width = int(weight.shape[0]) if weight is not None else int(info["width"])
    out = np.full((len(keys), width), np.nan, np.float32)
    todo = [i for i, k in enumerate(keys) if k in pixels]
    for start in range(0, len(todo), p.batch_size):
        rows = todo[start:start + p.batch_size]
        x = torch.from_numpy(np.stack([pixels[keys[i]] for i in rows])).permute(0, 3, 1, 2).float()
        with torch.inference_mode():
            y = model((x - mean) / std)
            y = (pool_features(y) if weight is not None else y).float().numpy()
        out[rows] = y @ weight.T + bias if weight is not None else y
    status = ["ok" if k in pixels else "failed" for k in keys]
    error = [None if k in pixels else errors.get(k, "missing: no image in the shard's tar") for k in keys]
    table, stats = _part(keys, status, error, activate(out, p.activation), p.output)
    ds.write_sidecar(stage, shard, table)
    return stats


def run_score(input: str, params: ScoreParams, *, workers: int | None = None, summary: bool = True) -> dict[str, Any]:
    """Write the ``score_<name>`` sidecar of dataset ``input`` (resumable per shard).

    Everything is checked in the driver before any task starts: the files
    load, the head's input width matches the model's features (or the
    embeddings), ``output`` exists. Returns ``{"stage", "name", "outputs",
    "counts", "shards_done", "shards_skipped", "seconds"}``.
    """
    from webcurate.shards.dataset import Dataset
    from webcurate.shards.stage import run_sidecar_stage

    from webcurate.shards import global_stage

    ds = Dataset(input)
    _ = ds.manifest
    stage = score_stage(params.score_name)
    head = load_head(params.head) if params.head else None
    record: dict[str, Any] = {"name": params.score_name, "activation": params.activation, "output": params.output,
                              "head_sha256": head[2] if head else None}
    if params.model:
        _, info = build_model(params)
        outputs = check_widths(params, head, int(info["width"]), f"model {params.model}")
        record.update(source="images", model=params.model, weights_sha256=info["sha256"],
                      image_size=int(info["image_size"]))
        fn, kwargs = score_images_shard, {"params": params.as_record(), "sha": info["sha256"],
                                          "weight": head[0] if head else None, "bias": head[1] if head else None}
    else:
        emb = global_stage.stage_entry(ds, "embeddings")
        global_stage.require_complete(ds, "embeddings", "embed")
        outputs = check_widths(params, head, int(emb.get("dim") or 0),
                               f"the embeddings of {ds.root} ({emb.get('model')})")
        record.update(source="embeddings", embeddings=emb.get("weights_sha256"),
                      embeddings_run=global_stage.stage_run(ds.root, "embeddings"))
        fn, kwargs = score_embeddings_shard, {"weight": head[0], "bias": head[1], "activation": params.activation,
                                              "output": params.output}
    res = run_sidecar_stage(ds, stage, fn, record, kwargs={"stage": stage, **kwargs}, workers=workers,
                            summary=summary, outputs=outputs)
    return {"stage": stage, "name": params.score_name, "outputs": outputs,
            "counts": dict(res.totals),
            "shards_done": sorted(res.done), "shards_skipped": sorted(res.skipped), "seconds": round(res.seconds, 2)}


def read_scores(ds, name: str) -> dict[str, float]:
    """``{key: score}`` of the complete ``score_<name>`` sidecar (samples without a score left out)."""
    from webcurate.shards import global_stage

    stage = score_stage(name)
    if not ds.sidecar_completed(stage):
        raise ConfigError(f"{ds.root} has no `{stage}` table; run `webcurate score --input {ds.root} --name {name} "
                          "...` first")
    global_stage.require_complete(ds, stage, "score")
    t = ds.read_sidecar(stage, columns=["key", "score"])
    return {k: float(v) for k, v in zip(t["key"].to_pylist(), t["score"].to_pylist()) if v is not None}


def sampling_priority(scores: np.ndarray, *, weighted: bool = True, seed: int = 0) -> np.ndarray:
    """(N,) order keys for score-weighted sampling: the smallest are taken first.

    ``weighted``: a weighted draw without replacement (Efraimidis-Spirakis:
    Exp(1) / score, so a sample with twice the score is about twice as likely
    to be taken first); else strictly highest score first. Scores must be
    >= 0 for the weighted draw; NaN (no score) sorts last.
    """
    s = np.asarray(scores, dtype=np.float64)
    if weighted:
        if np.nanmin(s, initial=0.0) < 0:
            raise ConfigError("score-weighted sampling needs scores >= 0 (use a sigmoid/softmax activation)")
        key = np.random.default_rng(seed).exponential(size=s.shape[0]) / np.maximum(s, 1e-12)
    else:
        key = -s
    return np.where(np.isnan(s), np.inf, key)


def _floors(min_score: list[str] | dict[str, float] | None) -> dict[str, float]:
    """``{name: floor}`` from ``NAME=VALUE`` items (or a mapping); ConfigError naming --min-score."""
    from pydantic import ValidationError

    from .quality_params import FilterParams

    try:
        return FilterParams(min_score=min_score or []).score_floors
    except ValidationError as e:
        raise ConfigError(f"--min-score: {e.errors()[0]['msg']}") from None


def score_runs(ds, min_score: list[str] | dict[str, float] | None, weight_by: str | None) -> dict[str, Any]:
    """{score stage: run id} of the scores ``sample`` uses, recorded so a re-scored dataset re-samples."""
    from webcurate.shards.global_stage import stage_run

    names = [*_floors(min_score), *([weight_by] if weight_by else [])]
    return {score_stage(n): stage_run(ds.root, score_stage(n)) for n in names}


def score_selection(ds, keys: list[str], ok: np.ndarray, min_score: list[str] | dict[str, float] | None,
                    weight_by: str | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """What ``webcurate sample --min-score / --weight-by`` changes for candidate ``keys``.

    ok: (N,) bool candidates. Returns (ok narrowed to keys whose score meets
    every floor, (ok.sum(),) sampling priority of the remaining candidates
    for ``weight_by``, or None without it). A key without a score fails a
    floor and is taken last when weighting.
    """
    ok = ok.copy()
    for name, floor in _floors(min_score).items():
        s = read_scores(ds, name)
        ok &= np.array([s.get(k, -np.inf) >= floor for k in keys], dtype=bool)
    prio = None
    if weight_by:
        s = read_scores(ds, weight_by)
        vals = np.array([s.get(k, np.nan) for k, o in zip(keys, ok) if o], dtype=np.float64)
        prio = sampling_priority(vals, weighted=True, seed=seed)
    return ok, prio
