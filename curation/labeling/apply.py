"""Applying LFs over a dataset's shards as Ray tasks -> the ``lf_votes`` sidecar.

One task per shard builds the shard's records (``records.shard_records``),
runs every LF on every record and writes ``<root>/lf_votes/part-N.parquet``:
``key``, one int16 column per LF (class index or -1), and ``lf_errors``
(JSON ``{lf: "Error: message"}`` for the LFs that raised on that sample,
null when none did). An LF that raises, or returns something that is not a
class, abstains on that sample and its error is recorded; the shard stats
count errors per LF (``errors:<lf>``) and keep the first message of each,
so the stage summary shows which LF broke and why. Finished shards are
recorded in the manifest and skipped by a re-run; changing the LF file (its
hash is a stage parameter) starts the stage over.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from webcurate.shards.dataset import Dataset, DatasetError

from .lf import ABSTAIN, LFSet, coerce_vote, lf_name, lfset_from_source
from .records import RecordBatch, available_sidecars, shard_records

STAGE = "lf_votes"
ERRORS_COLUMN = "lf_errors"
_MAX_ERROR_CHARS = 300


def apply_to_records(
    lfs: Sequence[Any], records: Sequence[Any], classes: Sequence[str]
) -> tuple[np.ndarray, list[dict[str, str] | None]]:
    """Run each LF on each record.

    Returns ``L`` (n, m) int16 votes (-1 = abstain) and, per record, None or
    ``{lf name: error}`` for the LFs that failed on it (those abstain).
    An LF with a vectorised ``batch`` form is called once for all records;
    if that raises or returns an invalid vote, it is re-run record by record
    so each failure lands on the sample that caused it.
    """
    n, m, k = len(records), len(lfs), len(classes)
    L = np.full((n, m), ABSTAIN, dtype=np.int16)
    errors: list[dict[str, str] | None] = [None] * n
    for j, lf in enumerate(lfs):
        name = lf_name(lf)
        if n and getattr(lf, "has_batch", False):
            try:
                votes = np.asarray(lf.batch(records))
                if votes.shape == (n,) and np.issubdtype(votes.dtype, np.integer) \
                        and votes.min() >= ABSTAIN and votes.max() < k:
                    L[:, j] = votes
                    continue
            except Exception:
                pass  # attributed per sample below
        for i, rec in enumerate(records):
            try:
                L[i, j] = coerce_vote(lf(rec), name, classes)
            except Exception as e:  # the LF's own bug: record it, abstain, go on
                msg = f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]
                if errors[i] is None:
                    errors[i] = {}
                errors[i][name] = msg
    return L, errors


def votes_table(keys: Sequence[str], L: np.ndarray, names: Sequence[str],
                errors: Sequence[dict[str, str] | None]) -> pa.Table:
    """The sidecar part: key, one int16 column per LF, lf_errors (JSON or null)."""
    cols: dict[str, pa.Array] = {"key": pa.array(list(keys), pa.string())}
    for j, name in enumerate(names):
        cols[name] = pa.array(L[:, j].astype(np.int16), pa.int16())
    cols[ERRORS_COLUMN] = pa.array([json.dumps(e, sort_keys=True) if e else None for e in errors], pa.string())
    return pa.table(cols)


# -- the shard task ------------------------------------------------------------
def _materialize(payload: dict[str, Any]) -> list[Any]:
    if payload["kind"] == "source":
        return lfset_from_source(payload["source"], payload["path"]).lfs
    return list(payload["lfs"])


def apply_shard(
    shard: int,
    *,
    root: str,
    lf_payload: dict[str, Any],
    classes: list[str],
    sidecars: dict[str, list[int]],
    stage: str = STAGE,
) -> dict[str, Any]:
    """Ray task: votes of every LF on the ok samples of one shard, written as a sidecar part."""
    t0 = time.time()
    lfs = _materialize(lf_payload)
    names = [lf_name(lf) for lf in lfs]
    ds = Dataset(root)
    stages = [s for s, shards in sidecars.items() if shard in shards]
    records: RecordBatch = shard_records(ds, shard, sidecars=stages)
    L, errors = apply_to_records(lfs, records, classes)
    ds.write_sidecar(stage, shard, votes_table([r["key"] for r in records], L, names, errors))
    counts: dict[str, int] = {"total": len(records)}
    voted = L != ABSTAIN
    counts["covered"] = int(voted.any(axis=1).sum())
    counts["no_votes"] = len(records) - counts["covered"]
    first: dict[str, str] = {}
    for j, name in enumerate(names):
        counts[f"votes:{name}"] = int(voted[:, j].sum())
        ne = sum(1 for e in errors if e and name in e)
        if ne:
            counts[f"errors:{name}"] = ne
            first[name] = next(e[name] for e in errors if e and name in e)
    return {"counts": counts, "first_errors": first, "seconds": round(time.time() - t0, 3)}


# -- the driver ----------------------------------------------------------------
@dataclass
class ApplySummary:
    """Per-LF error counts and first messages over all shards of the stage."""

    total: int
    covered: int
    errors: dict[str, int]
    first_errors: dict[str, str]
    votes: dict[str, int]


def _payload(lfset: LFSet) -> dict[str, Any]:
    if lfset.source is not None:
        return {"kind": "source", "source": lfset.source, "path": lfset.path or "<lfs>"}
    return {"kind": "objects", "lfs": list(lfset.lfs)}


def apply_lfs(
    dataset: Dataset | str,
    lfset: LFSet,
    classes: Sequence[str],
    *,
    stage: str = STAGE,
    sidecars: Sequence[str] | None = None,
    workers: int | None = None,
    summary: bool = True,
) -> ApplySummary:
    """Apply the LFs to every completed shard of ``dataset`` (resumable).

    ``sidecars``: which sidecar stages to merge into records (default:
    embeddings, clusters, retrieve when present). A sidecar covering only
    some shards is used where present, with a warning.
    """
    from webcurate.shards.stage import run_sidecar_stage

    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    shards = ds.completed_shards()
    if not shards:
        raise DatasetError(f"{ds.root} has no completed shards to label")
    avail = available_sidecars(ds, sidecars)
    for s, covered in avail.items():
        missing = sorted(set(shards) - set(covered))
        if missing:
            warnings.warn(f"sidecar `{s}` of {ds.root} covers {len(shards) - len(missing)} of {len(shards)} "
                          f"shards; records of shards {missing[:5]}{'...' if len(missing) > 5 else ''} lack its fields",
                          stacklevel=2)
    parameters = {"lfs": lfset.names, "lf_sha": lfset.sha, "classes": list(classes),
                  "sidecars": sorted(avail)}
    run_sidecar_stage(
        ds, stage, apply_shard, parameters,
        kwargs={"lf_payload": _payload(lfset), "classes": list(classes), "sidecars": avail, "stage": stage},
        workers=workers, summary=summary,
    )
    return stage_summary(ds, stage, lfset.names)


def stage_summary(ds: Dataset, stage: str, names: Sequence[str]) -> ApplySummary:
    """Totals, per-LF error counts and first error messages from the manifest."""
    entry = ds.reload().manifest.get("stages", {}).get(stage, {})
    stats = entry.get("shard_stats", {})
    counts = entry.get("counts", {})
    first: dict[str, str] = {}
    for key in sorted(stats):
        for name, msg in (stats[key].get("first_errors") or {}).items():
            first.setdefault(name, msg)
    return ApplySummary(
        total=int(counts.get("total", 0)), covered=int(counts.get("covered", 0)),
        errors={n: int(counts.get(f"errors:{n}", 0)) for n in names},
        first_errors=first, votes={n: int(counts.get(f"votes:{n}", 0)) for n in names},
    )


@dataclass
class Votes:
    """The label matrix of a dataset: ``keys`` (n,), ``L`` (n, m) int16, per-key error JSON."""

    keys: list[str]
    L: np.ndarray
    lf_names: list[str]
    errors: list[str | None]


def read_votes(dataset: Dataset | str, lf_names: Sequence[str], stage: str = STAGE) -> Votes:
    """Read the votes sidecar (completed parts, in shard order) as a matrix."""
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    table = ds.read_sidecar(stage)
    missing = [n for n in lf_names if n not in table.column_names]
    if missing:
        raise DatasetError(f"{ds.root}/{stage} has no column for LF(s) {missing}; re-run the LFs")
    n = table.num_rows
    L = np.full((n, len(lf_names)), ABSTAIN, dtype=np.int16)
    for j, name in enumerate(lf_names):
        L[:, j] = table.column(name).to_numpy(zero_copy_only=False)
    errs = table.column(ERRORS_COLUMN).to_pylist() if ERRORS_COLUMN in table.column_names else [None] * n
    return Votes(keys=table.column("key").to_pylist(), L=L, lf_names=list(lf_names), errors=errs)
