"""Starting or joining Ray: in-process locally by default, a cluster via RAY_ADDRESS."""
from __future__ import annotations

import logging
import os


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Connect to Ray once per process.

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster; without one a
    local Ray is started in-process, the embedded default. Safe to call again.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(
        ignore_reinit_error=True,
        logging_level=logging.WARNING if quiet else logging.INFO,
        log_to_driver=True,
    )
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    # Ray Data's own progress bars would fight ours.
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    except Exception:
        pass


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def max_node_cpus() -> float:
    """CPUs of the largest alive node: no single task or actor can ask for more."""
    import ray

    cpus = [float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]
    return max(cpus, default=1.0)


def min_node_memory_per_cpu() -> float:
    """Bytes of Ray ``memory`` per CPU on the alive node with the least: what one task per CPU can reserve."""
    import ray

    shares = [float(r.get("memory", 0.0)) / float(r["CPU"]) for r in
              (n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")) if r.get("CPU")]
    return min(shares, default=2.0 * (1 << 30))
