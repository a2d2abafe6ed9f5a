"""``webcurate filter``: thresholds over the ``quality`` (and score) sidecars -> the ``filter`` sidecar.

Every sample keeps its row: ``<root>/filter/part-N.parquet`` holds ``key``,
``keep`` (bool) and ``reason`` (the filters it failed, comma-separated, in
the order of ``REASONS``; null when kept). The decisions are per shard (one
Ray task each, resumable); only duplicate captions need the whole dataset,
so the driver counts caption hashes first and ships the over-used ones to
the tasks. Changing a threshold re-decides from the stored scores; nothing
is decoded again.

Later stages leave filtered samples out (``filtered_keys``). A filter that
would remove more than ``max_removed`` of the pool (default half) is refused
unless ``allow_mass_removal`` is set: its decisions stay on disk for the
report, but no stage applies them. A filter that removes every sample is an
error either way.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from webcurate.shards.errors import ConfigError, DatasetError

from . import quality
from .captions import JUNK_FILENAME, JUNK_NO_LETTERS, JUNK_URL
from .quality_params import REASONS, FilterParams, score_stage

STAGE = "filter"


class FilterError(DatasetError):
    """The filter's outcome cannot be used as it stands (mass removal, nothing left)."""


def _float(table, name: str) -> np.ndarray:
    return np.asarray(table[name].to_numpy(zero_copy_only=False), dtype=np.float64)


def decide(table, p: FilterParams, duplicate_hashes: np.ndarray,
           scores: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, list[str | None]]:
    """Decisions for one ``quality`` part: (keep (N,) bool, reason per row or None).

    ``duplicate_hashes``: sorted int64 caption hashes used more than
    ``max_caption_repeats`` times in the dataset; ``scores``: ``{name: (N,)
    float64}`` aligned with the rows (NaN = no score). Comparisons with a
    missing (NaN) value are false, so a failed score never filters silently:
    it is reported as ``score_<name>`` (missing) below.
    """
    n = table.num_rows
    off = set(p.skip)
    on = lambda name, limit: name not in off and limit is not None  # noqa: E731
    hits: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore"):
        hits["undecodable"] = np.asarray(table["status"].to_pylist(), dtype=object) != quality.STATUS_OK
        q = {c: _float(table, c) for c in quality.SCORE_COLUMNS}
        for name, col, limit, below in (
                ("dark", "brightness", p.min_brightness, True), ("bright", "brightness", p.max_brightness, False),
                ("blank", "contrast", p.min_contrast, True), ("low_information", "entropy", p.min_entropy, True),
                ("blurry", "blur", p.min_blur, True), ("noise", "noise", p.max_noise, False),
                ("grayscale", "colorfulness", p.min_colorfulness, True),
                ("jpeg_artefacts", "blockiness", p.max_blockiness, False),
                ("upscaled", "upscale", p.max_upscale, False)):
            if on(name, limit):
                hits[name] = q[col] < limit if below else (q[col] >= limit if name == "upscaled" else q[col] > limit)
        w = np.where(np.isnan(_float(table, "original_width")), _float(table, "width"), _float(table, "original_width"))
        h = np.where(np.isnan(_float(table, "original_height")), _float(table, "height"),
                     _float(table, "original_height"))
        short, long_ = np.minimum(w, h), np.maximum(w, h)
        if on("small", p.min_side):
            hits["small"] = short < p.min_side
        if on("aspect", p.max_aspect):
            hits["aspect"] = long_ / np.maximum(short, 1) > p.max_aspect
        chars = _float(table, "caption_chars")
        has_caption = ~np.isnan(chars)
        if p.require_caption:
            hits["no_caption"] = ~has_caption
        if on("caption_short", p.min_caption_chars):
            hits["caption_short"] = chars < p.min_caption_chars
        if on("caption_long", p.max_caption_chars):
            hits["caption_long"] = chars > p.max_caption_chars
        if p.caption_junk and "caption_junk" not in off:
            junk = np.asarray(table["caption_junk"].to_pylist(), dtype=object)
            for kind in (JUNK_URL, JUNK_FILENAME, JUNK_NO_LETTERS):
                hits[f"caption_{kind}"] = junk == kind
        if on("caption_duplicate", p.max_caption_repeats) and len(duplicate_hashes):
            col = table["caption_hash"]
            hashes = col.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)  # exact: no float detour
            valid = col.is_valid().to_numpy(zero_copy_only=False)
            hits["caption_duplicate"] = valid & np.isin(hashes, duplicate_hashes)
        for name, floor in p.score_floors.items():
            s = (scores or {}).get(name)
            if s is None:
                raise ConfigError(f"min_score {name}: no scores were passed for it")
            hits[f"score_{name}"] = ~(s >= floor)  # NaN (no score) counts as below
    names = [r for r in (*REASONS, *(f"score_{s}" for s in p.score_floors)) if r in hits]
    mat = np.stack([hits[r] for r in names], axis=1) if names else np.zeros((n, 0), bool)
    keep = ~mat.any(axis=1)
    reasons = [None if keep[i] else ",".join(names[j] for j in np.flatnonzero(mat[i])) for i in range(n)]
    return keep, reasons


# -- the stage ------------------------------------------------------------------------------

def duplicate_caption_hashes(ds, max_repeats: int | None) -> np.ndarray:
    """Sorted int64 caption hashes that more than ``max_repeats`` samples of ``ds`` share."""
    if max_repeats is None:
        return np.zeros(0, np.int64)
    chunks = []
    for s in ds.sidecar_completed(quality.STAGE):
        col = ds.read_sidecar_part(quality.STAGE, s, columns=["caption_hash"])["caption_hash"]
        chunks.append(col.drop_null().to_numpy(zero_copy_only=False).astype(np.int64))
    if not chunks:
        return np.zeros(0, np.int64)
    values, counts = np.unique(np.concatenate(chunks), return_counts=True)
    return values[counts > max_repeats]


def filter_shard(shard: int, root: str, params: dict[str, Any], duplicate_hashes: np.ndarray) -> dict[str, Any]:
    """Ray task: decide one shard from its ``quality`` (and score) parts; write its ``filter`` part."""
    import pyarrow as pa

    from webcurate.shards.dataset import Dataset

    p = FilterParams.model_validate(params)
    ds = Dataset(root)
    table = ds.read_sidecar_part(quality.STAGE, shard)
    keys = table["key"].to_pylist()
    scores: dict[str, np.ndarray] = {}
    for name in p.score_floors:
        part = ds.read_sidecar_part(score_stage(name), shard, columns=["key", "score"])
        by_key = dict(zip(part["key"].to_pylist(), part["score"].to_pylist()))
        scores[name] = np.array([np.nan if by_key.get(k) is None else by_key[k] for k in keys], dtype=np.float64)
    keep, reasons = decide(table, p, duplicate_hashes, scores)
    ds.write_sidecar(STAGE, shard, pa.table({"key": pa.array(keys, pa.string()),
                                             "keep": pa.array(keep, pa.bool_()),
                                             "reason": pa.array(reasons, pa.string())}))
    counts: dict[str, int] = {"total": len(keys), "kept": int(keep.sum()), "removed": int((~keep).sum())}
    for r in reasons:
        for name in (r or "").split(",") if r else ():
            counts[f"removed:{name}"] = counts.get(f"removed:{name}", 0) + 1
    return {"counts": counts}


def _upstream(ds, p: FilterParams) -> dict[str, Any]:
    """What the decisions depend on besides the thresholds: the recorded quality and score stages."""
    from webcurate.shards import global_stage

    up = {quality.STAGE: global_stage.stage_run(ds.root, quality.STAGE)}
    for name in p.score_floors:
        stage = score_stage(name)
        if not ds.sidecar_completed(stage):
            raise DatasetError(f"min_score {name}: {ds.root} has no `{stage}` table; run "
                               f"`webcurate score --input {ds.root} --name {name} ...` first")
        global_stage.require_complete(ds, stage, "score")
        up[stage] = global_stage.stage_run(ds.root, stage)
    return up


def run_filter(input: str, params: FilterParams | None = None, *, workers: int | None = None,
               summary: bool = True) -> dict[str, Any]:
    """Score the images once (``quality`` sidecar, resumable), then write the ``filter`` sidecar.

    Returns ``{"counts", "removed_share", "refused", "shards_done", "shards_skipped"}``.
    Raises FilterError (decisions kept on disk) when the filter removes every
    sample, or more than ``max_removed`` of them without ``allow_mass_removal``.
    """
    from webcurate.shards import manifest as manifest_mod
    from webcurate.shards.dataset import Dataset
    from webcurate.shards.stage import run_sidecar_stage

    p = params or FilterParams()
    ds = Dataset(input)
    _ = ds.manifest
    from webcurate.shards import global_stage

    quality.run_quality(input, workers=workers, summary=summary)
    global_stage.require_complete(ds, quality.STAGE, "filter")
    parameters = {**p.decision_record(), "upstream": _upstream(ds, p)}
    dups = duplicate_caption_hashes(ds, None if "caption_duplicate" in p.skip else p.max_caption_repeats)
    res = run_sidecar_stage(ds, STAGE, filter_shard, parameters, workers=workers, summary=summary,
                            kwargs={"params": p.as_record(), "duplicate_hashes": dups},
                            duplicate_captions=int(len(dups)))
    counts = dict(res.totals)
    total, removed = int(counts.get("total", 0)), int(counts.get("removed", 0))
    share = removed / total if total else 0.0
    by_reason = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])
                          if k.startswith("removed:"))
    refused = None
    if total and removed == total:
        refused = (f"the filter removes every one of the {total} samples of {ds.root} ({by_reason}); "
                   "loosen the thresholds (the report's histograms show each score) or --skip a filter")
    elif share > p.max_removed and not p.allow_mass_removal:
        refused = (f"the filter would remove {removed} of {total} samples ({share:.0%}, over --max-removed "
                   f"{p.max_removed:g}): {by_reason}; check the thresholds against the report's histograms, "
                   "or pass --allow-mass-removal to apply it")
    manifest_mod.record_stage(ds.root, STAGE, parameters, refused=refused, removed_share=round(share, 4))
    if refused:
        raise FilterError(refused + f". The scores ({ds.root}/quality) and decisions ({ds.root}/filter) are "
                          "kept; no other stage applies them while refused")
    return {"counts": counts, "removed_share": share, "refused": None, "shards_done": sorted(res.done),
            "shards_skipped": sorted(res.skipped), "seconds": round(res.seconds, 2)}


def _filter_ran(ds) -> bool:
    """Whether ``filter`` ran on ``ds``; a refused filter is an error, not a silent "keep everything"."""
    from webcurate.shards import global_stage

    entry = global_stage.stage_entry(ds, STAGE)
    if entry.get("refused"):
        raise FilterError(f"the `filter` of {ds.root} was refused ({entry['refused']}); re-run "
                          "`webcurate filter` with other thresholds or --allow-mass-removal")
    return bool(entry)


def _removed(t) -> set[str]:
    return {k for k, kp in zip(t["key"].to_pylist(), t["keep"].to_pylist()) if not kp}


def filtered_keys(ds) -> set[str]:
    """Keys the dataset's ``filter`` removed (empty when no filter ran); later stages leave them out.

    A refused or partial filter is an error, not a silent "keep everything".
    """
    from webcurate.shards import global_stage

    if not _filter_ran(ds):
        return set()
    global_stage.require_complete(ds, STAGE, "filter")
    return _removed(ds.read_sidecar(STAGE, columns=["key", "keep"]))


def removed_in_shard(root: str, shard: int) -> set[str]:
    """Keys of one shard the dataset's ``filter`` removed (empty when no filter ran), for per-part readers.

    Same rules as ``filtered_keys``: a refused or partial filter is an error.
    """
    from webcurate.shards.dataset import Dataset

    ds = Dataset(root)
    if not _filter_ran(ds):
        return set()
    if shard not in set(ds.sidecar_completed(STAGE)):
        raise DatasetError(f"`filter` of {root} has no part for shard {shard:05d}; re-run "
                           f"`webcurate filter --input {root}` to finish it")
    return _removed(ds.read_sidecar_part(STAGE, shard, columns=["key", "keep"]))
