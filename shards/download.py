"""Fetching images over HTTP(S) with urllib3: address guard, one deadline, size cap, opt-outs.

One ``Downloader`` per shard task holds a urllib3 pool whose connections

- resolve the host themselves and refuse destinations that are not public
  (link-local such as 169.254.169.254 always; private and loopback unless
  ``allow_private_addresses``), for the first request and for every redirect
  hop, and then connect to the very address that was checked (no second DNS
  answer can slip in between);
- live under one deadline per download: a watchdog shuts the socket of a
  request that outlives ``total_timeout``, so connect, headers and body
  together are bounded (a server that drips its headers a byte at a time
  cannot hold a thread past it).

Redirects are followed here, not by urllib3, so each hop is checked against
the scheme and address rules and its ``X-Robots-Tag`` counts. Retries are the
caller's (``shards.sources``): it keeps a ``urllib3.util.Retry`` per URL and
waits in the per-host scheduler rather than sleeping in a thread.

Every failure raises ``FetchFailed`` with a short ``reason`` that becomes the
sample's error (``timeout``, ``http_404``, ``too_many_redirects``,
``body_too_large``, ``connection_error``, ``blocked_address``, ``opted_out`` …).
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, LocationValueError, NameResolutionError,
                                NewConnectionError, ProtocolError, ReadTimeoutError, SSLError)
from urllib3.util import Timeout
from urllib3.util.connection import create_connection

USER_AGENT = "webcurate/0.1 (image dataset builder; honours X-Robots-Tag noai/noimageai)"
# img2dataset's defaults: these X-Robots-Tag directives opt an image out.
DEFAULT_DISALLOWED = ("noai", "noimageai", "noindex", "noimageindex")
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
# X-Robots-Tag directives that carry a value after a colon; anything else before a colon is a user agent.
_VALUED_DIRECTIVES = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}


@dataclass(frozen=True)
class FetchOptions:
    """How one URL is fetched (timeouts in seconds; limits per host are this task's share)."""

    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    total_timeout: float = 30.0  # connect + headers + body of one attempt
    retries: int = 2
    backoff: float = 0.25  # urllib3 backoff factor: 0, 2b, 4b, ... between attempts
    max_bytes: int = 32 * 1024 * 1024
    max_redirects: int = 5
    user_agent: str = USER_AGENT
    disallowed_robots: tuple[str, ...] = DEFAULT_DISALLOWED
    allow_private_addresses: bool = False  # loopback / private ranges (on-prem mirrors, tests)
    allow_local_files: bool = False  # file:// and absolute paths in URL lists
    allow_s3_sources: bool = False  # s3:// objects in URL lists, any bucket ...
    s3_source_buckets: tuple[str, ...] = ()  # ... or only these buckets
    host_concurrency: int = 16  # requests in flight per host in this task (0: no cap)
    host_rate: float = 0.0  # request starts per second per host in this task (0: no limit)
    max_retry_after: float = 60.0  # a longer Retry-After fails the sample instead of waiting


class FetchFailed(Exception):
    """One source could not be read; ``reason`` is the short code recorded as the sample's error."""

    def __init__(self, reason: str, detail: str = "", status: int | None = None,
                 response: urllib3.BaseHTTPResponse | None = None, error: Exception | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.status = status  # HTTP status, when the server answered with an error
        self.response = response  # that answer (headers only), for Retry / Retry-After
        self.error = error  # the urllib3 error, for Retry's connect/read accounting


def user_agent_token(user_agent: str) -> str:
    """The product token robots directives address: ``MyBot/1.0 (+url)`` -> ``mybot``."""
    return user_agent.strip().split("/", 1)[0].split()[0].lower() if user_agent.strip() else ""


def opted_out(values: list[str] | str | None, disallowed: tuple[str, ...], agent: str = "webcurate") -> bool:
    """True when an X-Robots-Tag header (one value or every value sent) opts the image out for ``agent``.

    ``otherbot: noai, noindex`` applies to otherbot only (the scope runs to the
    end of that header value); unscoped directives apply to every agent.
    """
    if not values:
        return False
    for value in [values] if isinstance(values, str) else values:
        scope = None
        for part in value.split(","):
            part = part.strip().lower()
            head, sep, rest = part.partition(":")
            if sep and head.strip() not in _VALUED_DIRECTIVES and " " not in head.strip():
                scope, part = head.strip(), rest.strip()
            if scope not in (None, agent, "*"):
                continue
            if any(d in disallowed for d in part.split()):
                return True
    return False


def blocked_reason(ip: str, allow_private: bool) -> str | None:
    """Why connecting to ``ip`` is refused (None: allowed).

    Link-local (cloud metadata at 169.254.169.254, fe80::/10), unspecified,
    multicast and reserved addresses are always refused; every other
    non-public address (loopback, RFC 1918, CGNAT, ULA) unless ``allow_private``.
    """
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback:  # before "reserved": ::1 lies in the reserved ::/8
        return None if allow_private else "loopback address"
    if addr.is_link_local or addr.is_unspecified or addr.is_multicast or addr.is_reserved:
        return "link-local/reserved address"
    if not addr.is_global and not allow_private:
        return "private address"
    return None


class _Deadlines:
    """Shuts the socket of a request that outlives its deadline (checked every ``tick`` s).

    The thread making a request sets its deadline, and the connection arms
    itself on connect and on every request, so a pooled keep-alive connection
    is covered as well as a new one.
    """

    def __init__(self, tick: float = 0.1):
        self.tick = tick
        self._local = threading.local()
        self._lock = threading.Lock()
        self._armed: dict[int, tuple[float, HTTPConnection]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set(self, deadline: float | None) -> None:
        self._local.deadline = deadline
        if deadline is None:
            with self._lock:
                self._armed.pop(threading.get_ident(), None)

    def arm(self, conn: HTTPConnection) -> None:
        deadline = getattr(self._local, "deadline", None)
        if deadline is None:
            return
        with self._lock:
            self._armed[threading.get_ident()] = (deadline, conn)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="webcurate-deadlines", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            now = time.monotonic()
            with self._lock:
                late = [tid for tid, (d, _) in self._armed.items() if d <= now]
                conns = [self._armed.pop(tid)[1] for tid in late]
            for conn in conns:
                sock = conn.sock
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns at once
                    except OSError:
                        pass

    def close(self) -> None:
        self._stop.set()


def _guarded(base: type[HTTPConnection], allow_private: bool, deadlines: _Deadlines) -> type[HTTPConnection]:
    class Guarded(base):  # type: ignore[misc, valid-type]
        def _new_conn(self) -> socket.socket:
            try:
                infos = socket.getaddrinfo(self._dns_host, self.port, type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                raise NameResolutionError(self.host, self, e) from e
            addresses = list(dict.fromkeys(info[4][0] for info in infos))
            for ip in addresses:  # any bad answer refuses the host: no picking the good one
                why = blocked_reason(ip, allow_private)
                if why:
                    raise FetchFailed("blocked_address", f"{self.host} resolves to {ip} ({why})")
            last: Exception | None = None
            for ip in addresses:
                try:
                    return create_connection((ip, self.port), self.timeout, source_address=self.source_address,
                                             socket_options=self.socket_options)
                except socket.timeout as e:
                    raise ConnectTimeoutError(self, f"connect to {self.host} timed out") from e
                except OSError as e:
                    last = e
            raise NewConnectionError(self, f"failed to connect to {self.host}: {last}")

        def connect(self) -> None:
            deadlines.arm(self)
            super().connect()

        def request(self, *args, **kwargs) -> None:  # type: ignore[override]
            deadlines.arm(self)
            super().request(*args, **kwargs)

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded


class Downloader:
    """A urllib3 pool with the address guard and deadline watchdog; one per shard task, thread-safe."""

    def __init__(self, opts: FetchOptions, pool_maxsize: int = 16):
        self.opts = opts
        self.agent = user_agent_token(opts.user_agent)
        self._deadlines = _Deadlines()
        http_conn = _guarded(HTTPConnection, opts.allow_private_addresses, self._deadlines)
        https_conn = _guarded(HTTPSConnection, opts.allow_private_addresses, self._deadlines)
        self.pool = urllib3.PoolManager(num_pools=64, maxsize=max(1, pool_maxsize), block=False,
                                        headers={"User-Agent": opts.user_agent, "Accept": "image/*,*/*;q=0.5"})
        self.pool.pool_classes_by_scheme = {
            "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
        }

    def close(self) -> None:
        self._deadlines.close()
        self.pool.clear()

    def __enter__(self) -> "Downloader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get(self, url: str) -> bytes:
        """The body of ``url`` after at most ``max_redirects`` hops, within ``total_timeout``; one attempt."""
        opts = self.opts
        deadline = time.monotonic() + opts.total_timeout
        self._deadlines.set(deadline)
        try:
            current = url
            for _hop in range(opts.max_redirects + 1):
                r = self._open(current, deadline)
                try:
                    robots = r.headers.getlist("X-Robots-Tag")
                    if opted_out(robots, opts.disallowed_robots, self.agent):
                        raise FetchFailed("opted_out", f"X-Robots-Tag: {', '.join(robots)}"[:200])
                    if r.status in REDIRECT_STATUS and r.headers.get("Location"):
                        current = urllib.parse.urljoin(current, r.headers["Location"].strip())
                        if urllib.parse.urlsplit(current).scheme.lower() not in ("http", "https"):
                            raise FetchFailed("invalid_url", f"redirect to a non-HTTP URL {current[:100]!r}")
                        continue
                    if r.status >= 400:
                        raise FetchFailed(f"http_{r.status}", r.reason or "", status=r.status, response=r)
                    return self._body(r, deadline)
                finally:
                    _finish(r)
            raise FetchFailed("too_many_redirects", f"more than {opts.max_redirects} redirects")
        except FetchFailed:
            raise
        except Exception as e:  # noqa: BLE001 - urllib3/http.client/ssl raise many types; map them to reasons
            raise _as_failure(e, deadline) from e
        finally:
            self._deadlines.set(None)

    def _open(self, url: str, deadline: float) -> urllib3.BaseHTTPResponse:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchFailed("timeout", f"not complete after {self.opts.total_timeout:g}s")
        timeout = Timeout(connect=min(self.opts.connect_timeout, left), read=min(self.opts.read_timeout, left))
        return self.pool.urlopen("GET", url, redirect=False, retries=False, preload_content=False,
                                 decode_content=True, timeout=timeout)

    def _body(self, r: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
        cap = self.opts.max_bytes
        length = r.headers.get("Content-Length", "")
        if length.strip().isdigit() and int(length) > cap:
            raise FetchFailed("body_too_large", f"Content-Length {length.strip()} > {cap}")
        try:
            # One read of at most cap + 1 bytes: a drip cannot outlast the deadline, the
            # watchdog shuts the socket then (cheaper than a read loop checking the clock).
            data = r.read(cap + 1)
        except Exception as e:  # noqa: BLE001 - a body cut short, whatever layer noticed
            if time.monotonic() >= deadline or isinstance(e, (ReadTimeoutError, socket.timeout)):
                raise FetchFailed("timeout", f"body not complete after {self.opts.total_timeout:g}s") from e
            raise FetchFailed("truncated", f"{type(e).__name__}: {e}"[:200]) from e
        if len(data) > cap:
            raise FetchFailed("body_too_large", f"more than {cap} bytes")
        if time.monotonic() >= deadline:  # the watchdog closed the socket: the body is cut, not complete
            raise FetchFailed("timeout", f"body not complete after {self.opts.total_timeout:g}s")
        return data


def _finish(r: urllib3.BaseHTTPResponse) -> None:
    """Give the connection back: drained when little is left, else closed (never read a big unwanted body)."""
    try:
        if r.length_remaining is not None and r.length_remaining <= 65536 and not r.isclosed():
            r.drain_conn()
        else:
            r.close()
        r.release_conn()
    except Exception:  # noqa: BLE001 - a broken connection is simply not reused
        pass


def _as_failure(e: Exception, deadline: float) -> FetchFailed:
    """A urllib3 / socket error as a ``FetchFailed`` with a reason (past the deadline it is a timeout)."""
    detail = f"{type(e).__name__}: {e}"[:200]
    if isinstance(e, ConnectTimeoutError) and not isinstance(e, NewConnectionError):
        return FetchFailed("timeout", "connect timed out", error=e)
    if time.monotonic() >= deadline or isinstance(e, (ReadTimeoutError, socket.timeout)):
        return FetchFailed("timeout", "no complete answer within the deadline", error=e)
    if isinstance(e, NewConnectionError):  # refused, unreachable, DNS
        return FetchFailed("connection_error", detail, error=e)
    if isinstance(e, SSLError):
        return FetchFailed("tls_error", detail, error=e)
    if isinstance(e, (LocationValueError, ValueError)):
        return FetchFailed("invalid_url", detail)
    if isinstance(e, (ProtocolError, HTTPError)):  # e.g. the server closed before answering
        return FetchFailed("connection_error", detail, error=e)
    if isinstance(e, OSError):
        return FetchFailed("connection_error", detail, error=e)
    return FetchFailed("request_error", detail)
