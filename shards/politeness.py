"""Per-host politeness inside one shard task: concurrency cap, request rate, Retry-After, backoff.

``HostScheduler.run`` hands jobs to worker threads so that each host has at
most ``concurrency`` requests in flight and at most ``rate`` request starts
per second (evenly spaced), and so that a host that answered 429/503 with
``Retry-After`` waits as a whole — while every other host's jobs keep
flowing. A job that asks to be retried later goes back to its host's queue
with a ready time; no thread sleeps on it. Jobs without a host (local files,
S3 objects, folder inputs) are never limited.

Results land by job index, so the output never depends on the schedule.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


class Again(Exception):
    """Raised by a job's work function: run it again after ``delay`` s (``host_wide``: hold its host too)."""

    def __init__(self, delay: float, host_wide: bool = False):
        super().__init__(f"again in {delay:.2f}s")
        self.delay = max(0.0, float(delay))
        self.host_wide = host_wide


@dataclass
class _Host:
    queue: collections.deque = field(default_factory=collections.deque)
    inflight: int = 0
    next_start: float = 0.0  # rate pacing
    blocked_until: float = 0.0  # Retry-After
    scheduled: bool = False  # in the ready list or the timed heap
    throttled: int = 0  # Retry-After waits honoured
    waited: float = 0.0  # seconds it was held by Retry-After


class HostScheduler:
    """Run ``work(index)`` for every job over ``threads`` threads with per-host limits."""

    def __init__(self, concurrency: int = 0, rate: float = 0.0):
        self.concurrency = int(concurrency) if concurrency and concurrency > 0 else 0
        self.interval = 1.0 / rate if rate and rate > 0 else 0.0
        self._hosts: dict[str, _Host] = {}
        self._ready: collections.deque[str] = collections.deque()
        self._timed: list[tuple[float, int, str]] = []  # (time, seq, host) hosts waiting for pacing/Retry-After
        self._later: list[tuple[float, int, str, int]] = []  # (time, seq, host, job) jobs in backoff
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._left = 0
        self._error: BaseException | None = None

    def run(self, hosts: list[str], work: Callable[[int], Any], threads: int) -> list[Any]:
        """Results of ``work(i)`` for each job ``i`` (whose host is ``hosts[i]``), in job order."""
        results: list[Any] = [None] * len(hosts)
        for i, host in enumerate(hosts):
            self._hosts.setdefault(host, _Host()).queue.append(i)
        self._left = len(hosts)
        for host in self._hosts:
            self._schedule(host, time.monotonic())
        workers = [threading.Thread(target=self._worker, args=(work, results), daemon=True,
                                    name=f"webcurate-fetch-{n}") for n in range(max(1, min(threads, len(hosts))))]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        if self._error is not None:
            raise self._error
        return results

    def stats(self) -> dict[str, Any]:
        """Hosts seen, and per-host Retry-After waits (the most throttled first)."""
        throttled = {h: s.throttled for h, s in self._hosts.items() if s.throttled and h}
        return {"hosts": sum(1 for h in self._hosts if h), "throttled": sum(throttled.values()),
                "throttle_seconds": round(sum(s.waited for s in self._hosts.values()), 2),
                "throttled_hosts": dict(sorted(throttled.items(), key=lambda kv: (-kv[1], kv[0]))[:10])}

    # -- the worker loop --------------------------------------------------------
    def _worker(self, work: Callable[[int], Any], results: list[Any]) -> None:
        while True:
            got = self._take()
            if got is None:
                return
            host, job = got
            try:
                results[job] = work(job)
            except Again as a:
                self._release(host, job, a)
                continue
            except BaseException as e:  # noqa: BLE001 - a bug: stop everyone, re-raise in run()
                with self._cond:
                    self._error = e
                    self._left = 0
                    self._cond.notify_all()
                return
            self._release(host, None, None)

    def _take(self) -> tuple[str, int] | None:
        with self._cond:
            while True:
                if self._left <= 0:
                    return None
                now = time.monotonic()
                self._promote(now)
                while self._ready:
                    host = self._ready.popleft()
                    h = self._hosts[host]
                    h.scheduled = False
                    if not h.queue or (self.concurrency and host and h.inflight >= self.concurrency):
                        continue  # rescheduled when a job comes back or a slot frees
                    start = max(h.next_start, h.blocked_until)
                    if host and start > now:
                        self._schedule(host, now)
                        continue
                    job = h.queue.popleft()
                    h.inflight += 1
                    if host and self.interval:
                        h.next_start = max(now, h.next_start) + self.interval
                    self._schedule(host, now)
                    return host, job
                self._cond.wait(timeout=self._next_wake(now))

    def _release(self, host: str, job: int | None, again: Again | None) -> None:
        with self._cond:
            h = self._hosts[host]
            h.inflight -= 1
            now = time.monotonic()
            if again is None:
                self._left -= 1
            elif again.host_wide and host:
                until = now + again.delay
                if until > h.blocked_until:
                    h.waited += until - max(now, h.blocked_until)
                    h.blocked_until = until
                h.throttled += 1
                h.queue.appendleft(job)
            else:
                heapq.heappush(self._later, (now + again.delay, next(self._seq), host, job))
            self._schedule(host, now)
            self._cond.notify_all()

    # -- bookkeeping (under the lock) ----------------------------------------------
    def _schedule(self, host: str, now: float) -> None:
        h = self._hosts[host]
        if h.scheduled or not h.queue:
            return
        h.scheduled = True
        start = max(h.next_start, h.blocked_until) if host else 0.0
        if start > now:
            heapq.heappush(self._timed, (start, next(self._seq), host))
        else:
            self._ready.append(host)

    def _promote(self, now: float) -> None:
        while self._later and self._later[0][0] <= now:
            _, _, host, job = heapq.heappop(self._later)
            self._hosts[host].queue.appendleft(job)
            self._schedule(host, now)
        while self._timed and self._timed[0][0] <= now:
            _, _, host = heapq.heappop(self._timed)
            h = self._hosts[host]
            h.scheduled = False
            self._schedule(host, now)

    def _next_wake(self, now: float) -> float | None:
        times = [t[0] for t in (self._timed[:1] + self._later[:1])]
        return max(0.0, min(times) - now) if times else None
