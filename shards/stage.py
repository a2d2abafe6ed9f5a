"""The stage contract: work split by shard, one Ray task per shard, resumable.

``run_shards`` is the generic engine (submit with backpressure, retries,
progress bar, per-shard completion callback). ``run_sidecar_stage`` applies it
to the common case "read a dataset shard, write ``<root>/<stage>/part-N``".

A shard task is a plain top-level function ``fn(shard: int, **kwargs) -> stats``
returning ``{"counts": {...}, ...}``. It must write its outputs atomically and
deterministically; the driver records completion in the manifest afterwards,
so a run killed at any point re-runs at most the shards in flight.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from webcurate.shards import manifest as manifest_mod

from .errors import RunError
from .progress import print_summary, progress_bar
from .ray_runtime import init_ray

if TYPE_CHECKING:  # the dataset module imports webdataset -> torch: not for every task
    from webcurate.shards.dataset import Dataset

# Exceptions worth retrying: transient I/O. Anything else fails the shard at once.
RETRYABLE = (OSError, ConnectionError, TimeoutError)


class StageError(RunError):
    """Some shards failed after retries; finished shards are kept."""


@dataclass
class StageResult:
    """What one run of a stage did; every stage returns one.

    ``done``: shards written by this run with their stats; ``skipped``: shards
    complete before it; ``failed``: shard -> reason after retries. ``totals`` are
    the stage's counts over every complete part (also after a run that had
    nothing to do); ``info`` holds stage-specific figures (edges, levels, ...)
    and ``warnings`` what the user should read.
    """

    stage: str
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    root: str = ""
    totals: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    message: str | None = None

    @property
    def counts(self) -> dict[str, int]:
        """Counts of the shards this run wrote."""
        return manifest_mod.sum_counts(self.done)

    @property
    def ran(self) -> bool:
        """True when this run did work (wrote or tried to write a part)."""
        return bool(self.done or self.failed)


def run_shards(
    fn: Callable[..., dict[str, Any]],
    shards: list[int],
    *,
    kwargs: dict[str, Any] | None = None,
    done: set[int] | None = None,
    on_done: Callable[[int, dict[str, Any]], None] | None = None,
    desc: str = "shards",
    workers: int | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    memory: int | None = None,
    max_retries: int = 3,
    count_key: str | None = "total",
    per_shard: dict[int, dict[str, Any]] | None = None,
) -> StageResult:
    """Run ``fn(shard, **kwargs, **per_shard[shard])`` as a Ray task for each shard not in ``done``.

    At most ``workers`` tasks are in flight (default: as many as the cluster's
    CPUs allow at ``num_cpus`` each); ``memory`` (bytes) is each task's Ray
    memory reservation. ``kwargs`` are shipped once for all tasks,
    ``per_shard`` values only to their own shard's task. ``on_done`` runs in
    the driver as each shard finishes, in completion order. Failures after
    retries are collected, not raised, so every finished shard is recorded;
    see ``StageResult.failed``.
    """
    import ray

    init_ray()
    kwargs = kwargs or {}
    done = done or set()
    todo = [s for s in shards if s not in done]
    result = StageResult(stage=desc, skipped=[s for s in shards if s in done])
    if workers is None:
        from .ray_runtime import cluster_cpus

        workers = max(1, int(cluster_cpus() // max(num_cpus, 1e-3)))
    remote = ray.remote(_call_with_shared_kwargs(fn)).options(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        **({"memory": int(memory)} if memory else {}),
        max_retries=max_retries,
        retry_exceptions=list(RETRYABLE),
        name=f"webcurate:{desc}",
    )
    kw_ref = ray.put(kwargs)  # shipped once, not per task
    t0 = time.time()
    pending: dict[Any, int] = {}
    queue = list(todo)
    bar = progress_bar(total=len(shards), initial=len(result.skipped), desc=desc, unit="shard")
    items = 0
    try:
        while queue or pending:
            while queue and len(pending) < workers:
                s = queue.pop(0)
                own = ray.put(per_shard[s]) if per_shard and s in per_shard else None
                pending[remote.remote(s, kw_ref, own)] = s
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                s = pending.pop(ref)
                try:
                    stats = ray.get(ref)
                except Exception as e:  # the task's own error, after retries
                    result.failed[s] = _short_error(e)
                    bar.update(1)
                    continue
                result.done[s] = stats
                if on_done is not None:
                    on_done(s, stats)
                if count_key:
                    items += int((stats.get("counts") or {}).get(count_key, 0))
                    el = max(time.time() - t0, 1e-6)
                    bar.set_postfix_str(f"{items} items, {items / el:.1f}/s")
                bar.update(1)
    finally:
        bar.close()
    result.seconds = time.time() - t0
    return result


def _short_error(e: BaseException) -> str:
    # RayTaskError wraps the original; its cause says what actually broke.
    cause = getattr(e, "cause", None) or e
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"[:500]


def _call_with_shared_kwargs(fn: Callable[..., dict[str, Any]]):
    """Adapter so tasks receive ``(shard, kwargs_ref, own_ref)`` and call ``fn(shard, **kwargs, **own)``."""

    def call(shard: int, kwargs: dict[str, Any], own: dict[str, Any] | None) -> dict[str, Any]:
        return fn(shard, **kwargs, **(own or {}))

    call.__name__ = getattr(fn, "__name__", "shard_task")
    call.__qualname__ = call.__name__
    return call


def run_sidecar_stage(
    dataset: "Dataset",
    stage: str,
    fn: Callable[..., dict[str, Any]],
    parameters: dict[str, Any],
    *,
    kwargs: dict[str, Any] | None = None,
    workers: int | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    count_key: str | None = "total",
    summary: bool = True,
    **stage_info: Any,
) -> StageResult:
    """Run a per-shard sidecar stage over the dataset's completed shards.

    Records ``stage`` with ``parameters`` (a change of parameters restarts
    completion), skips parts already complete, records each finished part
    (one completion object each), and raises ``StageError`` at the end if any
    shard failed (after the finished ones are safely recorded).
    """
    from .global_stage import GlobalStage

    run = GlobalStage(dataset, stage, parameters, command=stage)
    run.start(**stage_info)
    result = run.write_parts(fn, kwargs=kwargs, workers=workers, num_cpus=num_cpus, num_gpus=num_gpus,
                             count_key=count_key)
    return run.finish(result, summary=summary)


def raise_if_failed(result: StageResult) -> None:
    if result.failed:
        lines = "\n".join(f"  shard {s:05d}: {err}" for s, err in sorted(result.failed.items()))
        raise StageError(
            f"{len(result.failed)} shard(s) of stage `{result.stage}` failed; the "
            f"{len(result.done) + len(result.skipped)} finished ones are kept and a re-run resumes:\n{lines}"
        )
