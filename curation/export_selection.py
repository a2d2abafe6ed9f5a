"""`webcurate export`: write the latest selection as a new dataset.

The selection is, with ``auto``: the ``sample`` sidecar (balanced sampling)
when it exists, else ``retrieve``, else the ``dedup`` survivors. A stage that
exists but is incomplete is an error, not a silent fallback to an earlier
one. Each exported sample's json and index row gain what the curation
stages know about it (flat names, so they are plain parquet columns):

- ``cluster_level_1`` .. ``cluster_level_L``, ``cluster_distance``;
- ``dedup_keep``, ``dedup_duplicate_of``, ``dedup_similarity``,
  ``dedup_reason``, and ``dedup_removed`` (how many duplicates of this
  sample dedup dropped);
- ``retrieval_selected``, ``retrieval_score``, ``retrieval_seed_key``,
  ``retrieval_seed_dataset``, ``retrieval_mode``;
- ``curation_selection``: which stage selected it.

Numeric fields missing for a sample are filled with NaN / -1 / false rather
than null, so every shard's index has the same column types. Image bytes are
copied, never re-encoded (``webcurate.shards.subset.write_subset``); the new
manifest names the input as its parent.
"""
from __future__ import annotations

import math
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from webcurate.shards.dataset import Dataset, DatasetError

from webcurate.shards.global_stage import require_complete, stage_entry
from webcurate.shards.stage import StageResult

SELECTIONS = ("auto", "sample", "retrieve", "dedup")
# Which boolean column of each stage's sidecar marks a selected key, and the
# command that makes the stage (for error messages).
_FLAG = {"sample": "selected", "retrieve": "selected", "dedup": "keep"}
_COMMAND = {"sample": "sample", "retrieve": "retrieve", "dedup": "dedup", "clusters": "cluster"}
# Stage -> prefix of its merged fields; columns never merged.
_PREFIX = {"clusters": "cluster_", "dedup": "dedup_", "retrieve": "retrieval_"}
_SKIP = {"clusters": {"key", "status"}, "dedup": {"key"}, "retrieve": {"key"}}


def resolve_selection(ds: Dataset, selection: str = "auto") -> str:
    """The stage whose selection to export; a clear error when there is none or it is partial."""
    candidates = ("sample", "retrieve", "dedup") if selection == "auto" else (selection,)
    for stage in candidates:
        if ds.sidecar_completed(stage) or (selection != "auto"):
            require_complete(ds, stage, _COMMAND[stage])
            return stage
    raise DatasetError(
        f"{ds.root} has nothing selected to export yet: run `webcurate sample`, `webcurate retrieve` "
        "or `webcurate dedup` on it first"
    )


def selected_keys(ds: Dataset, stage: str) -> list[str]:
    """Keys whose selection flag is true in sidecar ``stage``, in sidecar order."""
    t = ds.read_sidecar(stage, columns=["key", _FLAG[stage]])
    return [k for k, v in zip(t["key"].to_pylist(), t[_FLAG[stage]].to_pylist()) if v]


def _default(t: pa.DataType) -> Any:
    """A non-null stand-in for a missing value of type ``t`` (None for strings)."""
    if pa.types.is_floating(t):
        return math.nan
    if pa.types.is_integer(t):
        return -1
    if pa.types.is_boolean(t):
        return False
    return None


def _merge_stage(ds: Dataset, stage: str, fields: dict[str, dict[str, Any]]) -> None:
    """Add sidecar ``stage``'s columns (prefixed) to ``fields[key]`` for the selected keys."""
    if not ds.sidecar_completed(stage):
        return
    table = ds.read_sidecar(stage)
    names = [c for c in table.column_names if c not in _SKIP[stage]]
    if stage == "clusters" and "status" in table.column_names:
        # A key dedup dropped has no cluster: leave its (-1, NaN) out of the export.
        table = table.filter(pc.equal(table["status"], "ok"))
    prefix = _PREFIX[stage]
    cols = {n: table[n].to_pylist() for n in names}
    types = {n: table.schema.field(n).type for n in names}
    for i, key in enumerate(table["key"].to_pylist()):
        f = fields.get(key)
        if f is None:
            continue
        for n in names:
            v = cols[n][i]
            f[prefix + n] = v if v is not None else _default(types[n])
    # Keys this stage has no row for still get every field, typed.
    for key, f in fields.items():
        for n in names:
            f.setdefault(prefix + n, _default(types[n]))
    if stage == "dedup" and "duplicate_of" in table.column_names:
        removed: dict[str, int] = {}
        for k, d in zip(table["key"].to_pylist(), table["duplicate_of"].to_pylist()):
            if d is not None and d != k:
                removed[d] = removed.get(d, 0) + 1
        for key, f in fields.items():
            f["dedup_removed"] = removed.get(key, 0)


def export_fields(ds: Dataset, keys: list[str], selection: str) -> dict[str, dict[str, Any]]:
    """key -> extra fields (cluster ids, dedup info, retrieval scores) for each selected key."""
    fields: dict[str, dict[str, Any]] = {k: {"curation_selection": selection} for k in keys}
    for stage in ("clusters", "dedup", "retrieve"):
        _merge_stage(ds, stage, fields)
    return fields


def run_export(input: str, output: str, *, summary: bool = True, **options: Any) -> StageResult:
    """Export the selected samples of ``input`` as a new dataset at ``output``; ``options`` are ``ExportParams``.

    ``info``: selection, selected, exported, missing (selected keys the
    source index no longer lists as ok), output, parent. Resumable:
    re-running continues a partial export and finishes at once when it is
    complete (then ``ran`` is false).
    """
    import time

    from webcurate.shards import manifest as manifest_mod
    from webcurate.shards.params import parse
    from webcurate.shards.subset import write_subset

    from .stage_params import ExportParams

    t0 = time.time()
    params = parse(ExportParams, options, "export")
    ds = Dataset(input)
    _ = ds.manifest  # a clear error when input is not a dataset
    stage = resolve_selection(ds, params.selection)
    keys = selected_keys(ds, stage)
    if not keys:
        raise DatasetError(f"the `{stage}` selection of {ds.root} is empty; nothing to export")
    fields = export_fields(ds, keys, stage)
    before = set(Dataset(output).completed_shards()) if manifest_mod.load(output) else set()
    sel = {"selection": stage, "selection_parameters": stage_entry(ds, stage).get("parameters")}
    m = write_subset(ds.root, output, fields, stage="export", parameters=sel, workers=params.workers,
                     summary=summary)
    after = set(Dataset(output).completed_shards())
    counts = m.get("counts") or {}
    exported = int(counts.get("ok", 0))
    result = StageResult(stage="export", root=output, done={s: {} for s in sorted(after - before)},
                         skipped=sorted(before), totals=dict(counts), seconds=time.time() - t0,
                         info={"selection": stage, "selected": len(keys), "exported": exported,
                               "missing": int(counts.get("missing", 0)), "output": output, "parent": m.get("parent")})
    if result.info["missing"]:
        result.warnings.append(f"{result.info['missing']} selected samples were not exported (no longer ok in "
                               f"the index of {ds.root}); see the export's index for their rows")
        print(f"warning: {result.warnings[-1]}")
    return result
