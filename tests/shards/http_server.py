"""A loopback HTTP server for ingest tests and benchmarks: good images and every bad case.

``ImageServer`` binds 127.0.0.1 on an ephemeral port, serves each connection on
its own daemon thread (HTTP/1.1 keep-alive, so clients that pool connections
are not throttled by us), and stops itself when leaving its ``with`` block:
handlers that hang or drip on purpose wake up on a stop event, so nothing
outlives the test.

Routes (all GET; ``<seed>`` is an int, sizes are ``<w>x<h>``):

==================================  ==========================================
``/good/<seed>.jpg|png|webp``       320x240 photo
``/good/<seed>-<w>x<h>.<ext>``      photo of that size
``/dup/<name>/<seed>[-WxH].<ext>``  the bytes of ``/good/<seed>[-WxH].<ext>``
``/status/<code>/<name>.jpg``       that HTTP status with a short text body
``/flaky/<n>/<name>.jpg``           503 for the first ``n`` requests, then a photo
``/hang/<name>.jpg``                accepts, never answers (read timeout)
``/drip/<name>.jpg``                headers at once, then ``drip_chunk`` bytes
                                    every ``drip_interval`` s: every read is fast,
                                    the whole body takes far too long
``/loop/<name>/a`` ``…/b``          302 a -> b -> a … (redirect loop)
``/redirect/<path>``                302 to ``/<path>``
``/html.jpg``                       HTML page served as ``image/jpeg``
``/truncated.jpg``                  first half of a JPEG
``/empty.jpg``                      200 with zero bytes
``/bomb.png``                       valid 30000x30000 1-bit PNG (~100 KB)
``/cmyk.jpg`` ``/png16.png``        CMYK JPEG, 16-bit PNG
``/anim.gif`` ``/exif6.jpg``        3-frame GIF, 320x240 JPEG with EXIF orientation 6
``/png-as-jpg/<seed>.jpg``          a PNG at a .jpg URL with ``image/jpeg``
``/big/<nbytes>.jpg``               valid JPEG padded to ``nbytes``, Content-Length set
``/big-stream/<nbytes>.jpg``        same without Content-Length (body ends at close)
``/robots/<tag>/<seed>.jpg``        photo with ``X-Robots-Tag: <tag>`` (``%20``/``,`` ok)
``/slow/<ms>/<path>``               waits ``ms`` then serves ``/<path>``
``/bulk/<file>``                    a file of ``bulk_dir`` (benchmarks)
``/goto/<quoted URL>``              302 to any URL (``file://``, 169.254.169.254 …)
``/header-drip/<name>.jpg``         status line and headers one byte every
                                    ``drip_interval`` s (no read ever times out)
``/limit/<R>/<name>.jpg``           429 + ``Retry-After: 1`` when more than R
                                    ``/limit`` requests arrived in the last second
``/throttle/<s>/<name>.jpg``        always 429 with ``Retry-After: <s>``
``/robots-hop/<tag>/<path>``        302 to ``/<path>`` carrying ``X-Robots-Tag``
``/gate/<path>``                    waits until ``gate`` is set, then serves ``/<path>``
anything added by ``add_file``      e.g. URL lists
==================================  ==========================================

``limit_arrivals`` holds the arrival time of every ``/limit`` request (and
``limit_refused`` how many got a 429), so tests can check the rate a client kept.

Run standalone (benchmarks, manual checks)::

    python tests/shards/http_server.py --bulk-dir DIR [--port 8000] [--aiohttp]
"""
from __future__ import annotations

import collections
import os
import re
import sys
import threading
import time
import urllib.parse
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


# Run as a script too (its own process): put tests/ on sys.path for the shared helper loader.
if os.path.dirname(os.path.dirname(os.path.abspath(__file__))) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import load_helper  # noqa: E402

gen = load_helper(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagegen.py"))

# Paths of the bad cases, by name (tests pair them with the expected outcome).
BAD_CASES: dict[str, str] = {
    "http_404": "/status/404/missing.jpg",
    "http_500": "/status/500/broken.jpg",
    "http_503_always": "/status/503/down.jpg",
    "flaky_503_once": "/flaky/1/flaky.jpg",
    "hang": "/hang/never.jpg",
    "drip": "/drip/slow.jpg",
    "redirect_loop": "/loop/x/a",
    "redirect_good": "/redirect/good/21.jpg",
    "html_as_jpeg": "/html.jpg",
    "truncated": "/truncated.jpg",
    "empty": "/empty.jpg",
    "bomb": "/bomb.png",
    "cmyk": "/cmyk.jpg",
    "png16": "/png16.png",
    "gif": "/anim.gif",
    "exif6": "/exif6.jpg",
    "png_as_jpg": "/png-as-jpg/22.jpg",
    "too_small": "/good/23-12x12.jpg",
    "bad_aspect": "/good/24-1200x60.jpg",
    "noai": "/robots/noai/25.jpg",
    "noimageai": "/robots/noimageai/26.jpg",
    "other_bot_noai": "/robots/otherbot:%20noai/27.jpg",
    "header_drip": "/header-drip/slow.jpg",
}

_CTYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp",
           "gif": "image/gif", "txt": "text/plain", "csv": "text/csv", "tsv": "text/tab-separated-values",
           "json": "application/json", "jsonl": "application/jsonl", "parquet": "application/octet-stream",
           "gz": "application/gzip"}


class ImageServer:
    """Threaded loopback HTTP server; use as a context manager.

    ``hits`` counts requests per path (with query), ``user_agents`` collects
    the User-Agent of every request, so tests can check retries and politeness.
    """

    def __init__(self, *, bulk_dir: str | None = None, drip_interval: float = 0.25, drip_chunk: int = 16,
                 hang_seconds: float = 300.0, big_default: int = 64 * 1024 * 1024, port: int = 0,
                 quiet: bool = True, host: str = "127.0.0.1"):
        self.bulk_dir = os.path.abspath(bulk_dir) if bulk_dir else None
        self.drip_interval = drip_interval
        self.drip_chunk = drip_chunk
        self.hang_seconds = hang_seconds
        self.big_default = big_default
        self.quiet = quiet
        self.files: dict[str, tuple[bytes, str, dict[str, str]]] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        self.user_agents: collections.Counter[str] = collections.Counter()
        self.host = host
        self.arrivals: list[tuple[float, str]] = []  # (time.monotonic(), path) of every request
        self.gate = threading.Event()  # releases /gate/ requests (tests decide when, not a timer)
        self.limit_arrivals: list[float] = []
        self.limit_refused = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._port = port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "ImageServer":
        # Build the costly payloads now, not inside a request a client is timing.
        for make in (gen.bomb_png, gen.cmyk_jpeg, gen.png16, gen.animated_gif, gen.exif_rotated_jpeg,
                     gen.truncated_jpeg, _drip_body):
            make()
        handler = _make_handler(self)
        httpd = ThreadingHTTPServer((self.host, self._port), handler)
        httpd.daemon_threads = True  # a hung handler must not keep the process alive
        httpd.block_on_close = False
        httpd.request_queue_size = 256  # benchmarks open many connections at once
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                         name="ImageServer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes hanging/dripping handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` (a route above or a name from ``BAD_CASES``)."""
        path = BAD_CASES.get(path, path)
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def add_file(self, path: str, data: bytes, content_type: str | None = None,
                 headers: dict[str, str] | None = None) -> str:
        """Serve ``data`` at ``path``; returns its URL."""
        if not path.startswith("/"):
            path = "/" + path
        ctype = content_type or _CTYPES.get(path.rsplit(".", 1)[-1].lower(), "application/octet-stream")
        self.files[path] = (data, ctype, dict(headers or {}))
        return self.url(path)

    def hit_count(self, path: str) -> int:
        return self.hits[BAD_CASES.get(path, path)]

    # -- used by the handler -------------------------------------------------
    def _record(self, path: str, ua: str) -> None:
        with self._lock:
            self.hits[path] += 1
            self.user_agents[ua] += 1
            self.arrivals.append((time.monotonic(), path))

    def _wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when the server is stopping."""
        return self._stop.wait(seconds)


def _drip_body() -> bytes:
    """A ~6 KB JPEG: at the default drip pace it takes over a minute to arrive."""
    return gen.photo_jpeg(13, 160, 120)


class _Reply:
    """What a route answers: status, headers, body, and optional body pacing."""

    def __init__(self, status: int = 200, body: bytes = b"", ctype: str = "image/jpeg",
                 headers: dict[str, str] | None = None, drip: bool = False, length: bool = True,
                 header_drip: bool = False):
        self.status, self.body, self.ctype = status, body, ctype
        self.headers = headers or {}
        self.drip = drip
        self.length = length
        self.header_drip = header_drip


def _routes(server: ImageServer) -> list[tuple[re.Pattern, Callable[..., _Reply | None]]]:
    def good(seed, w, h, ext):
        w, h = int(w or 320), int(h or 240)
        body = {"jpg": gen.photo_jpeg, "jpeg": gen.photo_jpeg, "png": gen.photo_png, "webp": gen.photo_webp}[ext](int(seed), w, h)
        return _Reply(body=body, ctype=_CTYPES[ext])

    def status(code, name):
        code = int(code)
        return _Reply(status=code, body=f"error {code} for {name}\n".encode(), ctype="text/plain")

    def flaky(n, name):
        if server.hits[f"/flaky/{n}/{name}.jpg"] <= int(n):
            return _Reply(status=503, body=b"busy, retry\n", ctype="text/plain", headers={"Retry-After": "0"})
        return _Reply(body=gen.photo_jpeg(zlib.crc32(name.encode()) % 1000 + 500))

    def hang(name):
        server._wait(server.hang_seconds)
        return None  # close without a reply

    def drip(name):
        return _Reply(body=_drip_body(), drip=True)

    def loop(name, side):
        nxt = "b" if side == "a" else "a"
        return _Reply(status=302, body=b"", ctype="text/plain",
                      headers={"Location": server.url(f"/loop/{name}/{nxt}")})

    def redirect(rest):
        return _Reply(status=302, body=b"", ctype="text/plain", headers={"Location": server.url("/" + rest)})

    def robots(tag, seed):
        return _Reply(body=gen.photo_jpeg(int(seed)), headers={"X-Robots-Tag": urllib.parse.unquote(tag)})

    def big(n, stream=False):
        n = int(n) if n else server.big_default
        return _Reply(body=gen.padded_jpeg(n), length=not stream)

    def slow(ms, rest):
        if server._wait(int(ms) / 1000.0):
            return None
        return _dispatch(server, "/" + rest)

    def bulk(name):
        if server.bulk_dir is None or "/" in name or name.startswith("."):
            return _Reply(status=404, body=b"no such bulk file\n", ctype="text/plain")
        path = os.path.join(server.bulk_dir, name)
        try:
            with open(path, "rb") as f:
                body = f.read()
        except OSError:
            return _Reply(status=404, body=b"no such bulk file\n", ctype="text/plain")
        return _Reply(body=body, ctype=_CTYPES.get(name.rsplit(".", 1)[-1].lower(), "application/octet-stream"))

    def limit(r, name):
        with server._lock:
            now = time.monotonic()
            server.limit_arrivals.append(now)
            recent = sum(1 for t in server.limit_arrivals if t > now - 1.0)
            if recent > int(r):
                server.limit_refused += 1
                return _Reply(status=429, body=b"slow down\n", ctype="text/plain", headers={"Retry-After": "1"})
        return _Reply(body=gen.photo_jpeg(zlib.crc32(name.encode()) % 1000 + 2000, 64, 48))

    def gate(rest):
        while not server.gate.wait(0.05):
            if server._stop.is_set():
                return None
        return _dispatch(server, "/" + rest)

    def throttle(secs, name):
        return _Reply(status=429, body=b"slow down\n", ctype="text/plain", headers={"Retry-After": secs})

    def robots_hop(tag, rest):
        return _Reply(status=302, body=b"", ctype="text/plain",
                      headers={"Location": server.url("/" + rest), "X-Robots-Tag": urllib.parse.unquote(tag)})

    fixed = {
        "/html.jpg": lambda: _Reply(body=gen.html_page()),
        "/truncated.jpg": lambda: _Reply(body=gen.truncated_jpeg()),
        "/empty.jpg": lambda: _Reply(body=b""),
        "/bomb.png": lambda: _Reply(body=gen.bomb_png(), ctype="image/png"),
        "/cmyk.jpg": lambda: _Reply(body=gen.cmyk_jpeg()),
        "/png16.png": lambda: _Reply(body=gen.png16(), ctype="image/png"),
        "/anim.gif": lambda: _Reply(body=gen.animated_gif(), ctype="image/gif"),
        "/exif6.jpg": lambda: _Reply(body=gen.exif_rotated_jpeg()),
    }
    table: list[tuple[str, Callable[..., _Reply | None]]] = [
        (r"/good/(\d+)(?:-(\d+)x(\d+))?\.(jpg|jpeg|png|webp)", good),
        (r"/dup/[^/]+/(\d+)(?:-(\d+)x(\d+))?\.(jpg|jpeg|png|webp)", good),
        (r"/status/(\d{3})/([^/]+)\.jpg", status),
        (r"/flaky/(\d+)/([^/]+)\.jpg", flaky),
        (r"/hang/([^/]+)\.jpg", hang),
        (r"/drip/([^/]+)\.jpg", drip),
        (r"/loop/([^/]+)/(a|b)", loop),
        (r"/redirect/(.+)", redirect),
        (r"/png-as-jpg/(\d+)\.jpg", lambda seed: _Reply(body=gen.photo_png(int(seed)), ctype="image/jpeg")),
        (r"/big/(\d*)\.jpg", big),
        (r"/big-stream/(\d*)\.jpg", lambda n: big(n, stream=True)),
        (r"/robots/([^/]+)/(\d+)\.jpg", robots),
        (r"/slow/(\d+)/(.+)", slow),
        (r"/bulk/([^/]+)", bulk),
        (r"/goto/(.+)", lambda u: _Reply(status=302, ctype="text/plain",
                                         headers={"Location": urllib.parse.unquote(u)})),
        (r"/header-drip/([^/]+)\.jpg", lambda name: _Reply(body=gen.photo_jpeg(14, 64, 48), header_drip=True)),
        (r"/limit/(\d+)/([^/]+)\.jpg", limit),
        (r"/throttle/(\d+)/([^/]+)\.jpg", throttle),
        (r"/robots-hop/([^/]+)/(.+)", robots_hop),
        (r"/gate/(.+)", gate),
    ]
    out = [(re.compile(re.escape(p) + "$"), (lambda f: (lambda: f()))(f)) for p, f in fixed.items()]
    out += [(re.compile(p + "$"), f) for p, f in table]
    return out


def _dispatch(server: ImageServer, path: str) -> _Reply | None:
    if path in server.files:
        body, ctype, headers = server.files[path]
        return _Reply(body=body, ctype=ctype, headers=headers)
    for pattern, fn in server._route_table:
        m = pattern.match(path)
        if m:
            return fn(*m.groups())
    return _Reply(status=404, body=f"no route {path}\n".encode(), ctype="text/plain")


def _make_handler(server: ImageServer) -> type[BaseHTTPRequestHandler]:
    server._route_table = _routes(server)  # type: ignore[attr-defined]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: pooled clients reuse connections
        server_version = "webcurate-test"
        sys_version = ""

        def log_message(self, fmt: str, *args) -> None:  # quiet unless asked
            if not server.quiet:
                super().log_message(fmt, *args)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            path = urllib.parse.urlsplit(self.path).path
            server._record(path, self.headers.get("User-Agent", ""))
            try:
                reply = _dispatch(server, path)
            except Exception as e:  # a bug in a route must show up as a 500, not a hang
                reply = _Reply(status=500, body=f"route error: {e!r}\n".encode(), ctype="text/plain")
            if reply is None:  # hang routes: drop the connection without a reply
                self.close_connection = True
                return
            if reply.header_drip:
                self._drip_headers(reply)
                return
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.ctype)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                if reply.length:
                    self.send_header("Content-Length", str(len(reply.body)))
                else:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if head:
                    return
                if reply.drip:
                    self.wfile.flush()
                    for i in range(0, len(reply.body), server.drip_chunk):
                        self.wfile.write(reply.body[i:i + server.drip_chunk])
                        self.wfile.flush()
                        if server._wait(server.drip_interval):
                            self.close_connection = True
                            return
                else:
                    self.wfile.write(reply.body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (timeouts, size caps)

        def _drip_headers(self, reply: _Reply) -> None:
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: {reply.ctype}\r\nX-Padding: {'x' * 64}\r\n"
                    f"Content-Length: {len(reply.body)}\r\n\r\n").encode()
            self.close_connection = True
            try:
                for i in range(len(head)):
                    self.wfile.write(head[i:i + 1])
                    self.wfile.flush()
                    if server._wait(server.drip_interval):
                        return
                self.wfile.write(reply.body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler


def serve_bulk_aiohttp(bulk_dir: str, port: int = 0) -> None:
    """Serve ``bulk_dir`` under ``/bulk/`` with aiohttp (sendfile, one event loop) until killed.

    Prints the base URL on stdout first. Costs a fraction of the CPU per request
    of the threaded server, so in benchmarks the clients, not the server, use
    the cores. Only the bulk route exists here.
    """
    import asyncio
    import socket

    from aiohttp import web

    root = os.path.abspath(bulk_dir)

    async def bulk(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = os.path.join(root, name)
        if "/" in name or name.startswith(".") or not os.path.isfile(path):
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Content-Type": _CTYPES.get(name.rsplit(".", 1)[-1].lower(),
                                                                           "application/octet-stream")})

    app = web.Application()
    app.router.add_get("/bulk/{name}", bulk)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)

    async def run() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock, backlog=1024).start()
        print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bulk-dir", help="folder served under /bulk/")
    ap.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    ap.add_argument("--aiohttp", action="store_true", help="serve only --bulk-dir, with aiohttp (benchmarks)")
    ap.add_argument("--verbose", action="store_true", help="log every request")
    args = ap.parse_args(argv)
    if args.aiohttp:
        if not args.bulk_dir:
            ap.error("--aiohttp needs --bulk-dir")
        serve_bulk_aiohttp(args.bulk_dir, args.port)
        return
    with ImageServer(bulk_dir=args.bulk_dir, port=args.port, quiet=not args.verbose) as srv:
        print(srv.base_url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
