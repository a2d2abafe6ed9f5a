"""The loopback test server serves exactly the cases the ingest tests rely on.

If one of these breaks, an ingest test could pass for the wrong reason (e.g.
a "timeout" case that really answers), so the server's behaviour is pinned here.
"""
from __future__ import annotations

import io
import socket
import struct
import time

import pytest
import requests
from PIL import Image


def get(srv, name, **kw):
    return requests.get(srv.url(name), timeout=kw.pop("timeout", 5), **kw)


def test_good_image_has_requested_size_and_type(image_server):
    r = get(image_server, "/good/3-400x300.png")
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (400, 300)
    # Deterministic: the same URL gives the same bytes every time.
    assert get(image_server, "/good/3-400x300.png").content == r.content


def test_status_routes_and_flaky_503_succeeds_on_second_request(image_server):
    assert get(image_server, "http_404").status_code == 404
    assert get(image_server, "http_500").status_code == 500
    assert get(image_server, "flaky_503_once").status_code == 503
    second = get(image_server, "flaky_503_once")
    assert second.status_code == 200 and Image.open(io.BytesIO(second.content)).format == "JPEG"
    assert image_server.hit_count("flaky_503_once") == 2


def test_hang_never_answers(image_server):
    t0 = time.time()
    with pytest.raises(requests.exceptions.ReadTimeout):
        get(image_server, "hang", timeout=(2, 0.5))
    assert time.time() - t0 < 3


def test_drip_keeps_each_read_fast_but_the_body_slow(image_server):
    with requests.get(image_server.url("drip"), stream=True, timeout=(2, 1.0)) as r:
        total = int(r.headers["Content-Length"])
        got = 0
        t0 = time.time()
        for chunk in r.raw.stream(16):  # each read returns within the 1 s read timeout
            got += len(chunk)
            if time.time() - t0 > 1.0:
                break
    rate = got / (time.time() - t0)
    # At this rate the whole body would take minutes.
    assert total / rate > 60


def test_redirects_good_and_loop(image_server):
    r = get(image_server, "redirect_good")
    assert r.status_code == 200 and r.history and r.history[0].status_code == 302
    with pytest.raises(requests.exceptions.TooManyRedirects):
        get(image_server, "redirect_loop")


def test_bad_payloads_are_what_they_claim(image_server):
    html = get(image_server, "html_as_jpeg")
    assert html.headers["Content-Type"] == "image/jpeg" and html.content.startswith(b"<!DOCTYPE html>")
    assert get(image_server, "empty").content == b""
    trunc = get(image_server, "truncated").content
    img = Image.open(io.BytesIO(trunc))
    with pytest.raises(OSError, match="truncated"):
        img.load()
    bomb = get(image_server, "bomb").content
    assert len(bomb) < 1_000_000
    # The IHDR chunk declares the size; the data really decodes to that many pixels.
    assert bomb[12:16] == b"IHDR" and struct.unpack(">II", bomb[16:24]) == (30000, 30000)
    assert bomb[24:26] == b"\x01\x00"  # 1-bit greyscale: 900 M pixels in ~100 KB


def test_unusual_modes(image_server):
    assert Image.open(io.BytesIO(get(image_server, "cmyk").content)).mode == "CMYK"
    assert Image.open(io.BytesIO(get(image_server, "png16").content)).mode.startswith("I;16")
    gif = Image.open(io.BytesIO(get(image_server, "gif").content))
    assert gif.n_frames == 3
    exif = Image.open(io.BytesIO(get(image_server, "exif6").content))
    assert exif.size == (320, 240) and exif.getexif()[0x0112] == 6
    wrong = get(image_server, "png_as_jpg")
    assert wrong.headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(wrong.content)).format == "PNG"


def test_big_bodies_with_and_without_length(image_server):
    r = get(image_server, "/big/3000000.jpg")
    assert int(r.headers["Content-Length"]) == 3_000_000 and len(r.content) == 3_000_000
    s = get(image_server, "/big-stream/2000000.jpg")
    assert "Content-Length" not in s.headers and len(s.content) == 2_000_000
    Image.open(io.BytesIO(s.content)).load()  # still a valid image: only a size cap rejects it


def test_robots_header_and_user_agent_recorded(image_server):
    r = get(image_server, "noai", headers={"User-Agent": "probe/1"})
    assert r.headers["X-Robots-Tag"] == "noai"
    assert get(image_server, "other_bot_noai").headers["X-Robots-Tag"] == "otherbot: noai"
    assert image_server.user_agents["probe/1"] == 1


def test_added_files_and_slow_prefix(image_server):
    url = image_server.add_file("/lists/urls.csv", b"url\nhttp://x/1.jpg\n")
    r = requests.get(url, timeout=5)
    assert r.text.startswith("url") and r.headers["Content-Type"] == "text/csv"
    t0 = time.time()
    assert get(image_server, "/slow/300/good/1.jpg").status_code == 200
    assert time.time() - t0 >= 0.3


def test_stop_releases_hanging_connections(http_server_mod):
    srv = http_server_mod.ImageServer(hang_seconds=600).start()
    port = srv.port
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"GET /hang/x.jpg HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    deadline = time.time() + 10
    while srv.hits["/hang/x.jpg"] == 0:  # the handler is inside the hang once it counted the request
        assert time.time() < deadline
        time.sleep(0.01)
    t0 = time.time()
    srv.stop()
    sock.settimeout(5)
    assert sock.recv(100) == b""  # the hanging handler woke up and closed the connection
    sock.close()
    assert time.time() - t0 < 5
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_hostile_routes_redirect_anywhere_throttle_and_drip_headers(image_server):
    r = requests.get(image_server.url("/goto/file%3A%2F%2F%2Fetc%2Fpasswd"), allow_redirects=False, timeout=5)
    assert r.status_code == 302 and r.headers["Location"] == "file:///etc/passwd"
    hop = requests.get(image_server.url("/robots-hop/noai/good/1.jpg"), allow_redirects=False, timeout=5)
    assert hop.status_code == 302 and hop.headers["X-Robots-Tag"] == "noai"
    t = get(image_server, "/throttle/7/x.jpg")
    assert t.status_code == 429 and t.headers["Retry-After"] == "7"
    codes = [get(image_server, f"/limit/3/{i}.jpg").status_code for i in range(5)]
    assert codes[:3] == [200] * 3 and codes[3:] == [429, 429]  # 5 within a second, limit 3
    assert image_server.limit_refused == 2 and len(image_server.limit_arrivals) == 5
    sock = socket.create_connection(("127.0.0.1", image_server.port), timeout=5)
    sock.sendall(f"GET /header-drip/x.jpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    got, t0 = b"", time.time()
    while time.time() - t0 < 0.5:
        got += sock.recv(100)
    sock.close()
    assert got and b"\r\n\r\n" not in got and len(got) <= 5  # a byte per 0.2 s, headers unfinished


def test_gate_holds_requests_until_released(image_server):
    import threading

    got = {}
    t = threading.Thread(target=lambda: got.setdefault("r", get(image_server, "/gate/good/4.jpg", timeout=30)))
    t.start()
    deadline = time.time() + 10
    while image_server.hits["/gate/good/4.jpg"] == 0:
        assert time.time() < deadline
        time.sleep(0.01)
    assert "r" not in got  # held
    image_server.gate.set()
    t.join(10)
    assert got["r"].status_code == 200
