"""The one helper every sidecar stage runs through, per-shard or global.

A *global* stage (dedup, retrieve, cluster, sample) decides with knowledge of
the whole dataset, then writes its decision per shard, the same layout as a
per-shard stage (``<root>/<stage>/part-<shard>.parquet`` keyed by ``key``).
Both kinds share, through ``GlobalStage``:

- the completion check: ``is_complete`` is true when the stage ran with these
  parameters and every shard's part exists, so a re-run has nothing to do;
- the stage record: ``start`` records parameters (a change starts a new run,
  so completion starts over) and ``finish`` records the end and the info;
- part writes as Ray tasks (``write_parts`` over ``run_shards``): each task
  writes its part atomically, the driver records it (one completion object)
  as it lands, so a killed run keeps every written part;
- one failure rule: failed parts are collected, finished ones are kept, and
  ``finish`` raises one ``StageError`` naming every failed shard; a re-run
  recomputes and writes only what is missing (outputs are deterministic);
- the summary table and the returned ``StageResult``.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from . import manifest as manifest_mod
from .errors import DatasetError
from .progress import print_summary, print_table
from .stage import StageResult, raise_if_failed, run_shards

if TYPE_CHECKING:  # the dataset module imports webdataset -> torch: not for every task
    from .dataset import Dataset


def stage_entry(ds: "Dataset", stage: str) -> dict[str, Any]:
    """The manifest entry of sidecar ``stage`` (empty when the stage never ran)."""
    return dict(ds.reload().manifest.get("stages", {}).get(stage, {}))


def stage_run(root: str, stage: str) -> str | None:
    """The current run id of ``stage`` (changes whenever its parameters change), None if it never ran.

    Downstream stages record it as the fingerprint of what they read.
    """
    rec = manifest_mod.stage_record(root, stage) or {}
    return rec.get("run")


def require_complete(ds: "Dataset", stage: str, command: str, shards: Iterable[int] | None = None) -> list[int]:
    """The shards of sidecar ``stage``; a clear error naming ``command`` when it is missing or partial."""
    want = set(ds.completed_shards() if shards is None else shards)
    have = set(ds.sidecar_completed(stage))
    if not have:
        raise DatasetError(f"{ds.root} has no `{stage}` table yet; run `webcurate {command} --input {ds.root}` first")
    missing = sorted(want - have)
    if missing:
        raise DatasetError(
            f"`{stage}` of {ds.root} covers {len(want) - len(missing)} of {len(want)} shards "
            f"(missing e.g. shard {missing[0]:05d}); re-run `webcurate {command} --input {ds.root}` to finish it"
        )
    return sorted(want)


class GlobalStage:
    """One run of sidecar stage ``stage`` on ``dataset`` with ``parameters`` (see the module docstring).

    ``command`` names the CLI command that makes the stage, for messages.
    """

    def __init__(self, dataset: "Dataset", stage: str, parameters: dict[str, Any], *, command: str):
        self.ds = dataset
        self.stage = stage
        self.parameters = manifest_mod.normalize(parameters)
        self.command = command
        self.t0 = time.time()

    @property
    def shards(self) -> list[int]:
        """The dataset's completed shards: every one gets a part."""
        return self.ds.completed_shards()

    def is_complete(self) -> bool:
        """True when the stage ran with these parameters and every shard's part is present."""
        rec = manifest_mod.stage_record(self.ds.root, self.stage) or {}
        if rec.get("parameters") != self.parameters:
            return False
        return set(self.shards) <= set(self.ds.sidecar_completed(self.stage))

    def todo(self) -> list[int]:
        """Shards whose part is still missing (call after ``start``)."""
        done = set(self.ds.sidecar_completed(self.stage))
        return [s for s in self.shards if s not in done]

    def start(self, **info: Any) -> None:
        """Record the stage with its parameters (``info`` goes into its record)."""
        self.t0 = time.time()
        manifest_mod.record_stage(self.ds.root, self.stage, self.parameters, **info)
        self.ds.reload()

    def write_parts(self, fn: Callable[..., dict[str, Any]], *, kwargs: dict[str, Any] | None = None,
                    per_shard: dict[int, dict[str, Any]] | None = None, workers: int | None = None,
                    num_cpus: float = 1.0, num_gpus: float = 0.0, memory: int | None = None,
                    count_key: str | None = "total") -> StageResult:
        """Run ``fn(shard, root=..., **kwargs, **per_shard[shard])`` as a Ray task per missing part.

        ``fn`` writes the shard's part atomically and returns ``{"counts": {...}}``;
        each finished part is recorded at once. Failures are collected in the result.
        """
        done = set(self.ds.sidecar_completed(self.stage))

        def on_done(shard: int, stats: dict[str, Any]) -> None:
            manifest_mod.record_shard(self.ds.root, shard, stats, stage=self.stage)

        result = run_shards(
            fn, self.shards, kwargs={"root": self.ds.root, **(kwargs or {})}, done=done, on_done=on_done,
            desc=self.stage, workers=workers, num_cpus=num_cpus, num_gpus=num_gpus, memory=memory,
            count_key=count_key, per_shard=per_shard,
        )
        result.root = self.ds.root
        return result

    def skipped(self) -> StageResult:
        """The result of a run that found the stage complete: nothing written."""
        return StageResult(stage=self.stage, root=self.ds.root, skipped=self.shards,
                           totals=dict(stage_entry(self.ds, self.stage).get("counts", {})),
                           info=_info(stage_entry(self.ds, self.stage)), seconds=time.time() - self.t0)

    def finish(self, result: StageResult, *, summary: bool = True, rows: list[tuple[Any, ...]] | None = None,
               title: str | None = None, **info: Any) -> StageResult:
        """Record the end (``info`` into the stage record), print the summary, raise on failed parts.

        ``rows`` (what, value) are stage-specific lines of the summary table.
        """
        manifest_mod.record_stage(self.ds.root, self.stage, self.parameters, finished=manifest_mod.now_iso(),
                                  **info)
        entry = stage_entry(self.ds, self.stage)
        result.totals = dict(entry.get("counts", {}))
        result.info.update(info)
        result.seconds = time.time() - self.t0
        if summary:
            title = title or f"{self.stage}: {self.ds.root}"
            if rows is None:
                print_summary(result, title=title)
            else:
                print_stage_table(result, title, rows)
        raise_if_failed(result)
        return result


_RECORD_KEYS = {"parameters", "run", "code_version", "started", "finished", "history", "completed_shards",
                "shard_stats", "counts"}


def _info(entry: dict[str, Any]) -> dict[str, Any]:
    """The stage-specific info a finished run recorded (everything but the bookkeeping)."""
    return {k: v for k, v in entry.items() if k not in _RECORD_KEYS}


def print_stage_table(result: StageResult, title: str, rows: list[tuple[Any, ...]]) -> None:
    """Totals, stage-specific rows, shards done/skipped/failed, seconds and warnings in one table."""
    lines = [(k, v) for k, v in result.totals.items()] + [tuple(r) for r in rows]
    lines.append(("shards written / skipped / failed",
                  f"{len(result.done)} / {len(result.skipped)} / {len(result.failed)}"))
    lines.append(("seconds", f"{result.seconds:.1f}"))
    if result.message:
        lines.append(("note", result.message))
    for w in result.warnings:
        lines.append(("warning", w))
    print_table(title, lines, ("what", "value"))
