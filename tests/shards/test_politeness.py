"""Per-host politeness (issue 16.2): a rate the server never sees exceeded, Retry-After honoured per host
without stalling other hosts, connect timeouts retried, and X-Robots-Tag scoped to our user agent and
read on every redirect hop."""
from __future__ import annotations

import pytest
from urllib3.exceptions import ConnectTimeoutError

from webcurate.shards.dataset import Dataset
from webcurate.shards.download import Downloader, FetchFailed, FetchOptions
from webcurate.shards.image_ops import ImageOptions
from webcurate.shards.ingest import fetch_and_process, ingest_urls
from webcurate.shards.sources import Attempts, RetryLater, _raise_retry

OPTS = FetchOptions(connect_timeout=2.0, read_timeout=5.0, total_timeout=10.0, retries=2, backoff=0.05,
                    allow_private_addresses=True)


def _max_per_second(times: list[float]) -> int:
    """The most arrivals inside any window of one second."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= 1.0:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def test_a_host_rate_keeps_a_429_server_under_its_limit_across_tasks(http_server_mod, ray_local, tmp_path):
    # The server refuses more than 10 requests per second; two shard tasks at once share a 9/s budget.
    with http_server_mod.ImageServer() as srv:
        urls = [srv.url(f"/limit/10/{i}.jpg") for i in range(28)]
        (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
        opts = FetchOptions(**{**OPTS.__dict__, "host_rate": 9.0})
        ingest_urls(str(tmp_path / "urls.txt"), str(tmp_path / "ds"), fetch_opts=opts, shard_size=14, workers=2,
                    threads=8, summary=False)
        arrivals, refused = list(srv.limit_arrivals), srv.limit_refused
    rows = Dataset(str(tmp_path / "ds")).index().to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 28
    assert refused == 0 and _max_per_second(arrivals) <= 10


def test_without_a_rate_the_same_server_throttles_us(http_server_mod):
    # The control: the limit above is what kept the server happy.
    with http_server_mod.ImageServer() as srv:
        rows = [{"source": srv.url(f"/limit/10/{i}.jpg")} for i in range(30)]
        results, stats = fetch_and_process(rows, None, ImageOptions(), OPTS, threads=8)
        assert srv.limit_refused > 0 and stats["throttled"] > 0
    assert all(e is None for _, e in results)  # Retry-After honoured: every sample still arrived


def test_a_throttling_host_waits_alone(http_server_mod):
    # Host A answers 429 Retry-After: 2 to everything; host B (another loopback address) is fine.
    with http_server_mod.ImageServer() as a, http_server_mod.ImageServer(host="127.0.0.2") as b:
        rows = [{"source": a.url(f"/throttle/2/{i}.jpg")} for i in range(4)]
        rows += [{"source": b.url(f"/good/{i}.jpg")} for i in range(12)]
        opts = FetchOptions(**{**OPTS.__dict__, "retries": 1})
        results, stats = fetch_and_process(rows, None, ImageOptions(), opts, threads=4)
        first_a = min(t for t, _ in a.arrivals)
        last_b = max(t for t, _ in b.arrivals)
        retries_a = sorted(t for t, _ in a.arrivals)[4:]
        host_a = f"127.0.0.1:{a.port}"
    assert [getattr(e, "reason", None) for _, e in results] == ["http_429"] * 4 + [None] * 12
    assert last_b - first_a < 1.5  # B was served while A waited out its Retry-After
    assert len(retries_a) == 4 and min(retries_a) - first_a >= 1.9  # A was not asked again before it said
    assert stats["throttled"] == 4 and list(stats["throttled_hosts"]) == [host_a]


def test_a_retry_after_beyond_the_cap_fails_at_once_and_connect_timeouts_are_retried(image_server):
    rows = [{"source": image_server.url("/throttle/3600/x.jpg")}]
    (_, err), = fetch_and_process(rows, None, ImageOptions(), OPTS, threads=1)[0]
    assert err.reason == "http_429" and "max-retry-after" in err.detail
    f = FetchFailed("timeout", "connect timed out", error=ConnectTimeoutError("connect timed out"))
    with pytest.raises(RetryLater):
        _raise_retry("http://h/x.jpg", f, OPTS, Attempts.for_options(OPTS))
    read = FetchFailed("timeout", "read timed out", error=None)
    _raise_retry("http://h/x.jpg", read, OPTS, Attempts.for_options(OPTS))  # a read timeout is final


def test_robots_directives_for_our_agent_token_and_on_redirect_hops(image_server):
    mine = image_server.url("/robots/mybot:%20noai/1.jpg")
    bot = FetchOptions(**{**OPTS.__dict__, "user_agent": "MyBot/1.0 (+https://example.com/bot)"})
    with Downloader(bot) as d, pytest.raises(FetchFailed, match="opted_out"):
        d.get(mine)
    with Downloader(OPTS) as d:
        assert d.get(mine)  # scoped to mybot: not for webcurate
        with pytest.raises(FetchFailed, match="opted_out"):
            d.get(image_server.url("/robots-hop/noai/good/2.jpg"))  # the opt-out was on the redirect
        with pytest.raises(FetchFailed, match="opted_out"):
            d.get(image_server.url("/robots/otherbot:%20noindex,%20webcurate:%20noai/3.jpg"))
