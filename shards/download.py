"""Fetching one image over HTTP(S) politely: timeouts, retries, size cap, opt-outs.

Every failure raises ``FetchFailed`` with a short ``reason`` that becomes the
sample's status/error (``timeout``, ``http_404``, ``too_many_redirects``,
``body_too_large``, ``connection_error``, ``opted_out`` …).
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import requests
import urllib3

USER_AGENT = "webcurate/0.1 (image dataset builder; honours X-Robots-Tag noai/noimageai)"
# img2dataset's defaults: these X-Robots-Tag directives opt an image out.
DEFAULT_DISALLOWED = ("noai", "noimageai", "noindex", "noimageindex")
RETRY_STATUS = {429, 500, 502, 503, 504}


@dataclass(frozen=True)
class FetchOptions:
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    total_timeout: float = 30.0  # whole body, so a slow drip cannot hold a thread forever
    retries: int = 2
    backoff: float = 0.25  # seconds, doubled per attempt, with jitter
    max_bytes: int = 32 * 1024 * 1024
    max_redirects: int = 5
    user_agent: str = USER_AGENT
    disallowed_robots: tuple[str, ...] = DEFAULT_DISALLOWED


class FetchFailed(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


_local = threading.local()


def _session(opts: FetchOptions) -> requests.Session:
    s = getattr(_local, "session", None)
    if s is None:
        s = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=8, max_retries=0)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        _local.session = s
    s.max_redirects = opts.max_redirects
    s.headers["User-Agent"] = opts.user_agent
    return s


def opted_out(header: str | None, disallowed: tuple[str, ...]) -> bool:
    """True when an X-Robots-Tag value contains a disallowed directive.

    Directives may be scoped to a user agent (``otherbot: noai``); scoped ones
    apply only when they name us.
    """
    if not header:
        return False
    for part in header.split(","):
        part = part.strip().lower()
        if ":" in part:
            agent, _, directive = part.partition(":")
            if agent.strip() not in ("webcurate", "*"):
                continue
            part = directive.strip()
        for d in part.split():
            if d in disallowed:
                return True
    return False


def fetch(url: str, opts: FetchOptions = FetchOptions()) -> bytes:
    """The body of ``url``; raises ``FetchFailed`` after bounded retries."""
    last: FetchFailed | None = None
    for attempt in range(opts.retries + 1):
        try:
            return _fetch_once(url, opts)
        except FetchFailed as e:
            last = e
            if not _retryable(e) or attempt == opts.retries:
                raise
            time.sleep(opts.backoff * (2 ** attempt) * (0.5 + random.random()))
    assert last is not None
    raise last


def _retryable(e: FetchFailed) -> bool:
    if e.reason == "connection_error":
        return True
    if e.reason.startswith("http_"):
        try:
            return int(e.reason[5:]) in RETRY_STATUS
        except ValueError:
            return False
    return False


def _fetch_once(url: str, opts: FetchOptions) -> bytes:
    sess = _session(opts)
    start = time.monotonic()
    try:
        with sess.get(url, stream=True, timeout=(opts.connect_timeout, opts.read_timeout)) as r:
            if r.status_code >= 400:
                raise FetchFailed(f"http_{r.status_code}", r.reason or "")
            if opted_out(r.headers.get("X-Robots-Tag"), opts.disallowed_robots):
                raise FetchFailed("opted_out", f"X-Robots-Tag: {r.headers.get('X-Robots-Tag')}")
            length = r.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > opts.max_bytes:
                raise FetchFailed("body_too_large", f"Content-Length {length} > {opts.max_bytes}")
            chunks = []
            size = 0
            while True:
                # read1 returns as soon as some bytes arrive, so the deadline below is
                # checked during a slow drip (iter_content blocks until 64 KiB are in).
                chunk = r.raw.read1(65536, decode_content=True)
                if not chunk:
                    break
                size += len(chunk)
                if size > opts.max_bytes:
                    raise FetchFailed("body_too_large", f"more than {opts.max_bytes} bytes")
                if time.monotonic() - start > opts.total_timeout:
                    raise FetchFailed("timeout", f"body not complete after {opts.total_timeout:.0f}s")
                chunks.append(chunk)
            return b"".join(chunks)
    except FetchFailed:
        raise
    except requests.exceptions.TooManyRedirects as e:
        raise FetchFailed("too_many_redirects", str(e)[:200])
    except (requests.exceptions.ConnectTimeout, requests.exceptions.ReadTimeout) as e:
        raise FetchFailed("timeout", type(e).__name__)
    except requests.exceptions.ConnectionError as e:
        # A read timeout during streaming surfaces as ConnectionError(ReadTimeoutError).
        if "timed out" in str(e).lower():
            raise FetchFailed("timeout", "read timed out")
        raise FetchFailed("connection_error", str(e)[:200])
    except requests.exceptions.InvalidURL as e:
        raise FetchFailed("invalid_url", str(e)[:200])
    except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema) as e:
        raise FetchFailed("invalid_url", str(e)[:200])
    except urllib3.exceptions.ReadTimeoutError:
        raise FetchFailed("timeout", "read timed out")
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.IncompleteRead) as e:
        raise FetchFailed("truncated", str(e)[:200])
    except urllib3.exceptions.HTTPError as e:
        raise FetchFailed("connection_error", str(e)[:200])
    except requests.exceptions.ChunkedEncodingError as e:
        raise FetchFailed("truncated", str(e)[:200])
    except requests.exceptions.RequestException as e:
        raise FetchFailed("request_error", f"{type(e).__name__}: {str(e)[:200]}")
