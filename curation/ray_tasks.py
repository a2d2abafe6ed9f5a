"""Ray tasks over the parts of a dataset, with bounded memory in the driver.

``map_tasks`` runs ``fn(item, **kwargs, **per_item[item])`` as one Ray task per
item (a shard, a cell group, a bucket). Results are handed to ``on_result``
as they arrive, so the driver reduces them on the fly and never holds them
all; with ``keep_refs=True`` results stay in Ray's object store and the driver
only gets references for the next phase. Each task reserves
``memory_per_task`` with Ray and sets faiss to its own CPUs.

Errors: a part the user must fix (a ``USER_ERRORS`` one: garbage, NaN, wrong
dimension, a bad score) is collected for every part and raised as one message listing
them; any other task failure after retries (a task out of memory, a lost
node beyond retries) is a ``RunError`` naming the failed items, with the
memory hint; nothing was recorded yet, so a re-run redoes the phase.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Hashable, Iterable

from webcurate.shards.errors import USER_ERRORS, RunError

# Runs of shards per task for passes whose output goes to one scratch file per task: enough runs to balance the
# CPUs, few enough files for the next pass to read; a run has at most MAX_BLOCK_SHARDS parts (~10k rows each).
BLOCKS_PER_CPU = 4
MAX_BLOCK_SHARDS = 64
# Transient I/O is retried inside Ray; a node that dies is retried by Ray itself.
RETRYABLE = (OSError, ConnectionError, TimeoutError)
MAX_RETRIES = 3


class TaskError(RunError):
    """Tasks of a global stage failed after retries; nothing of this phase was recorded."""


def task_threads(cpus: float) -> int:
    """Threads a task may use: its CPU reservation (at least 1)."""
    return max(1, int(cpus))


def _run(fn: Callable[..., Any], item: Hashable, kwargs: dict[str, Any], own: dict[str, Any] | None,
         threads: int) -> Any:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import faiss

    faiss.omp_set_num_threads(threads)
    return fn(item, **kwargs, **(own or {}))


def _short(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:400]


def _user_error(e: BaseException) -> BaseException | None:
    """The user-facing error (bad input, config) a task raised, else None."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, USER_ERRORS):
        return cause
    return e if isinstance(e, USER_ERRORS) else None


def map_tasks(
    fn: Callable[..., Any],
    items: Iterable[Hashable],
    *,
    kwargs: dict[str, Any] | None = None,
    per_item: dict[Hashable, dict[str, Any]] | None = None,
    desc: str = "tasks",
    memory: int | None = None,
    cpus: float = 1.0,
    gpus: float = 0.0,
    num_returns: int = 1,
    keep_refs: bool = False,
    on_result: Callable[[Hashable, Any], None] | None = None,
    in_flight: int | None = None,
) -> dict[Hashable, Any]:
    """Run ``fn`` per item as Ray tasks; returns ``{item: result}`` unless ``on_result`` takes them.

    ``keep_refs``: results are left in the object store and ``{item: ObjectRef}``
    (a list of ``num_returns`` refs each) is returned once they are all computed.
    """
    import ray

    from webcurate.shards.progress import progress_bar
    from webcurate.shards.ray_runtime import cluster_cpus, init_ray

    init_ray()
    items = list(items)
    remote = ray.remote(_run).options(
        num_cpus=cpus, num_gpus=gpus, num_returns=num_returns, max_retries=MAX_RETRIES,
        retry_exceptions=list(RETRYABLE), name=f"webcurate:{desc}",
        **({"memory": int(memory)} if memory else {}))
    kw_ref = ray.put(kwargs or {})
    threads = task_threads(cpus)

    def submit(item: Hashable):
        own = (per_item or {}).get(item)
        return remote.remote(fn, item, kw_ref, ray.put(own) if own is not None else None, threads)

    if keep_refs:
        refs = {item: submit(item) for item in items}
        _computed(refs, desc)
        return refs
    limit = in_flight or max(2, int(2 * cluster_cpus() // max(cpus, 1e-3)))
    out: dict[Hashable, Any] = {}
    user_errors: dict[Hashable, BaseException] = {}
    failed: dict[Hashable, str] = {}
    pending: dict[Any, Hashable] = {}
    queue = list(items)
    bar = progress_bar(total=len(items), desc=desc, unit="task")
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                item = queue.pop(0)
                ref = submit(item)
                pending[ref[0] if num_returns > 1 else ref] = (item, ref)
            ready, _ = ray.wait(list(pending), num_returns=1)
            for r in ready:
                item, ref = pending.pop(r)
                try:
                    value = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - sorted into user errors and task failures below
                    user = _user_error(e)
                    if user is not None:
                        user_errors[item] = user
                    else:
                        failed[item] = _short(e)
                    bar.update(1)
                    continue
                if on_result is not None:
                    on_result(item, value)
                else:
                    out[item] = value
                bar.update(1)
    finally:
        bar.close()
    if user_errors:
        first = next(iter(user_errors.values()))
        lines = "\n".join(f"  {e}" for e in list(user_errors.values())[:10])
        more = f"\n  ... and {len(user_errors) - 10} more" if len(user_errors) > 10 else ""
        if len(user_errors) == 1:
            raise first
        raise type(first)(f"{len(user_errors)} {desc} inputs are unusable:\n{lines}{more}")
    if failed:
        lines = "\n".join(f"  {k}: {v}" for k, v in sorted(failed.items(), key=lambda kv: str(kv[0]))[:10])
        hint = (" A task out of memory needs a larger --memory-per-task (tasks then hold more) or more, smaller "
                "tasks (a smaller --memory-per-task splits the work further).")
        raise TaskError(f"{len(failed)} {desc} task(s) failed after retries; nothing of this step was recorded, "
                        f"re-run the command to redo it:\n{lines}\n{hint}")
    return out


def _computed(refs: dict[Hashable, Any], desc: str) -> None:
    """Wait until every ref is computed (not fetched).

    The next phase's tasks ``ray.get`` these refs inside the task while holding
    their memory reservation; submitted before their inputs exist, they can
    take all of a node's memory resource and leave the producers unscheduled
    (a deadlock seen at 1M rows with 4 cell groups of 8 GiB on a 17 GiB node).
    """
    import ray

    from webcurate.shards.progress import progress_bar

    pending = [r for v in refs.values() for r in (v if isinstance(v, list) else [v])]
    bar = progress_bar(total=len(pending), desc=desc, unit="result")
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, fetch_local=False)
            bar.update(len(ready))
    finally:
        bar.close()


def shard_blocks(shards: list[int]) -> list[list[int]]:
    """Shards in consecutive runs: ``BLOCKS_PER_CPU`` per cluster CPU, at most ``MAX_BLOCK_SHARDS`` each."""
    from webcurate.shards.ray_runtime import cluster_cpus, init_ray

    init_ray()  # may be the stage's first Ray call
    per = max(1, min(MAX_BLOCK_SHARDS, -(-len(shards) // max(1, BLOCKS_PER_CPU * int(cluster_cpus())))))
    return [shards[i:i + per] for i in range(0, len(shards), per)]


def get(refs: Any) -> Any:
    """``ray.get`` for the results of ``map_tasks(keep_refs=True)``."""
    import ray

    return ray.get(refs)
