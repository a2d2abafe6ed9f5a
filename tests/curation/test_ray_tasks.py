"""map_tasks: results kept in the object store are computed before the next phase is submitted."""
import numpy as np


def _square(item: int) -> np.ndarray:
    return np.full(1000, item * item)


def _total(item: int, *, parts: list) -> int:
    import ray

    return int(sum(int(p.sum()) for p in ray.get(parts)))


def test_keep_refs_returns_computed_results_so_dependents_never_wait_holding_memory(ray_local):
    """A consumer that ``ray.get``s its inputs inside the task must not be scheduled before they exist:
    with memory reservations near a node's memory that order deadlocks."""
    import ray

    from webcurate.curation.ray_tasks import map_tasks

    refs = map_tasks(_square, range(4), desc="square", keep_refs=True)
    flat = list(refs.values())
    ready, not_ready = ray.wait(flat, num_returns=len(flat), timeout=0, fetch_local=False)
    assert len(ready) == 4 and not not_ready
    out = map_tasks(_total, [0], kwargs={"parts": flat}, desc="total")
    assert out[0] == 1000 * (0 + 1 + 4 + 9)


def test_keep_refs_with_several_returns_waits_for_all_of_them(ray_local):
    import ray

    from webcurate.curation.ray_tasks import map_tasks

    def pair(item: int) -> tuple:
        return item, -item

    refs = map_tasks(pair, range(3), desc="pair", num_returns=2, keep_refs=True)
    flat = [r for v in refs.values() for r in v]
    ready, _ = ray.wait(flat, num_returns=len(flat), timeout=0, fetch_local=False)
    assert len(ready) == 6
    assert ray.get(refs[2]) == [2, -2]
