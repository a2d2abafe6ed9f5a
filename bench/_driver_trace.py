"""Where the driver's private memory goes, step by step (bench/curation_scale.py --trace).

Installed in the benchmark's child process before ``run_dedup``: every
``map_tasks`` call of the curation modules becomes a named step, the time
between two steps is ``driver after <step>``, and a thread reads this
process's ``RssAnon`` every 0.1 s. ``report()`` gives per step the private
memory at its start, its peak and at its end, so a step whose growth follows
N stands out when the same trace runs at several sizes.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable

_steps: list[dict] = []
_current: dict = {}
_lock = threading.Lock()


def rss_anon() -> int:
    """This process's private resident memory in bytes (``RssAnon``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _begin(name: str) -> None:
    now = rss_anon()
    with _lock:
        if _current:
            _current.update(end=now, seconds=time.time() - _current["t0"])
            _steps.append(dict(_current))
        _current.clear()
        _current.update(step=name, start=now, peak=now, t0=time.time())


def _sample() -> None:
    while True:
        now = rss_anon()
        with _lock:
            if _current:
                _current["peak"] = max(_current["peak"], now)
        time.sleep(0.1)


def _wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    def traced(*args: Any, **kwargs: Any) -> Any:
        desc = kwargs.get("desc", getattr(args[0], "__name__", "tasks") if args else "tasks")
        _begin(str(desc))
        try:
            return fn(*args, **kwargs)
        finally:
            _begin(f"driver after {desc}")

    return traced


def install() -> None:
    """Trace every ``map_tasks`` the loaded curation modules call (import them first)."""
    from webcurate.curation import dedup, dedup_graph, ray_tasks  # noqa: F401 - loads the modules patched

    original = ray_tasks.map_tasks
    for name, mod in list(sys.modules.items()):
        if name.startswith("webcurate.") and getattr(mod, "map_tasks", None) is original:
            mod.map_tasks = _wrap(original)
    _begin("start")
    threading.Thread(target=_sample, daemon=True).start()


def report() -> list[dict]:
    """Steps in order: name, seconds, private MiB at start / peak / end."""
    _begin("end")
    mib = 1024 * 1024
    return [{"step": s["step"], "s": round(s["seconds"], 1), "start": round(s["start"] / mib, 1),
             "peak": round(s["peak"] / mib, 1), "end": round(s["end"] / mib, 1)} for s in _steps]
