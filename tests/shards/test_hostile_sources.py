"""A hostile URL list and hostile servers (issue 17, items 1-3): what may be read, from where, for how long.

- URL lists are http(s) only unless local files / S3 buckets are allowed explicitly;
  local reads are capped like downloads and refuse FIFOs and devices;
- no request reaches a link-local address (cloud metadata), directly, through DNS or
  through a redirect, and loopback/private ones only with ``allow_private_addresses``;
- one deadline covers connect, headers and body: a header drip ends as a timeout.

The link-local cases never open a socket to 169.254.169.254: the address is refused
after resolution and before connecting (the loopback cases below prove the same path).
"""
from __future__ import annotations

import os
import time
import urllib.parse

import pytest

from webcurate.shards.dataset import Dataset
from webcurate.shards.download import Downloader, FetchFailed, FetchOptions
from webcurate.shards.ingest import ingest_urls

LOOPBACK_OK = FetchOptions(connect_timeout=2.0, read_timeout=2.0, total_timeout=5.0, retries=0,
                           allow_private_addresses=True)


def reason_of(row: dict) -> str | None:
    return row["error"].split(":")[0] if row["error"] else None


def get(url: str, opts: FetchOptions) -> bytes:
    with Downloader(opts) as d:
        return d.get(url)


def failure(url: str, opts: FetchOptions) -> FetchFailed:
    with pytest.raises(FetchFailed) as e:
        get(url, opts)
    return e.value


# -- addresses ---------------------------------------------------------------------------

def test_loopback_is_refused_by_default_after_resolution(image_server):
    url = image_server.url("/good/1.jpg")
    f = failure(url, FetchOptions(retries=0))
    assert f.reason == "blocked_address" and "127.0.0.1" in f.detail
    # A name is checked by what it resolves to, not by how it is spelt.
    by_name = url.replace("127.0.0.1", "localhost")
    assert failure(by_name, FetchOptions(retries=0)).reason == "blocked_address"
    assert image_server.hits["/good/1.jpg"] == 0  # refused before connecting
    assert get(url, LOOPBACK_OK)[:2] == b"\xff\xd8"  # the explicit opt-in fetches it


@pytest.mark.parametrize("target", ["http://169.254.169.254/latest/meta-data/", "http://[::ffff:169.254.169.254]/",
                                    "http://[fe80::1]/x.jpg", "http://0.0.0.0:{port}/good/1.jpg"])
def test_link_local_and_unspecified_are_refused_always_even_through_a_redirect(image_server, target):
    target = target.format(port=image_server.port)
    assert failure(target, LOOPBACK_OK).reason == "blocked_address"  # directly
    hop = image_server.url("/goto/" + urllib.parse.quote(target, safe=""))
    f = failure(hop, LOOPBACK_OK)  # and as a redirect hop of an allowed URL
    assert f.reason == "blocked_address", f


def test_redirect_to_a_local_file_is_not_followed(image_server):
    hop = image_server.url("/goto/" + urllib.parse.quote("file:///etc/passwd", safe=""))
    assert failure(hop, LOOPBACK_OK).reason == "invalid_url"


# -- one deadline --------------------------------------------------------------------------

def test_header_drip_ends_as_a_timeout_within_the_total_deadline(http_server_mod):
    # One byte of the status line and headers every 0.3 s: every read returns well inside the
    # read timeout, the headers alone would take ~40 s.
    with http_server_mod.ImageServer(drip_interval=0.3) as srv:
        opts = FetchOptions(connect_timeout=2.0, read_timeout=5.0, total_timeout=2.0, retries=0,
                            allow_private_addresses=True)
        t0 = time.monotonic()
        f = failure(srv.url("header_drip"), opts)
        took = time.monotonic() - t0
    assert f.reason == "timeout"
    assert took < 2.0 + 1.0, f"header drip held the request {took:.1f}s past a 2s deadline"


def test_body_drip_on_a_kept_alive_connection_is_cut_too(image_server):
    # The second request reuses the pooled connection: the deadline must be armed on reuse.
    opts = FetchOptions(connect_timeout=2.0, read_timeout=5.0, total_timeout=1.5, retries=0,
                        allow_private_addresses=True)
    with Downloader(opts) as d:
        assert d.get(image_server.url("/good/2.jpg"))
        t0 = time.monotonic()
        with pytest.raises(FetchFailed, match="timeout"):
            d.get(image_server.url("drip"))
        assert time.monotonic() - t0 < 1.5 + 1.0


# -- what a URL list may name ----------------------------------------------------------------

@pytest.fixture
def local_corpus(tmp_path, imagegen):
    """A private PNG, a FIFO, a sparse 2 GiB file and a device, as a URL list would name them."""
    private = tmp_path / "private.png"
    private.write_bytes(imagegen.photo_png(3, 64, 48))
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    sparse = tmp_path / "sparse.jpg"
    with open(sparse, "wb") as f:
        f.truncate(2 * 1024 ** 3)  # no disk used, no memory if never read
    return {"private_abs": str(private), "private_url": f"file://{private}", "fifo": f"file://{fifo}",
            "sparse": str(sparse), "device": "/dev/zero"}


def _ingest(urls: list[str], out: str, tmp_path, opts: FetchOptions) -> dict[str, dict]:
    lst = tmp_path / f"{os.path.basename(out)}.txt"
    lst.write_text("\n".join(urls) + "\n")
    ingest_urls(str(lst), out, fetch_opts=opts, shard_size=100, workers=1, summary=False)
    return {r["source"]: r for r in Dataset(out).index().to_pylist()}


def test_url_lists_are_http_only_unless_local_and_s3_are_allowed(local_corpus, imagegen, image_server, ray_local,
                                                                 s3_bucket, tmp_path):
    from webcurate.shards import storage

    storage.write_bytes(f"{s3_bucket}/img/a.png", imagegen.photo_png(4, 64, 48))
    s3_url = f"{s3_bucket}/img/a.png"
    good = image_server.url("/good/5.jpg")
    urls = [local_corpus["private_abs"], local_corpus["private_url"], s3_url, "ftp://example.com/a.jpg", good]
    rows = _ingest(urls, str(tmp_path / "default"), tmp_path, LOOPBACK_OK)
    assert {u: (rows[u]["status"], reason_of(rows[u])) for u in urls} == {
        local_corpus["private_abs"]: ("failed", "blocked_source"),
        local_corpus["private_url"]: ("failed", "blocked_source"),
        s3_url: ("failed", "blocked_source"),
        "ftp://example.com/a.jpg": ("failed", "invalid_url"),
        good: ("ok", None),
    }
    assert "--allow-local-files" in rows[local_corpus["private_abs"]]["error"]

    # Opted in: local files are read, capped like downloads; non-regular files are refused at once.
    bucket = s3_bucket[len("s3://"):]
    opts = FetchOptions(**{**LOOPBACK_OK.__dict__, "allow_local_files": True, "max_bytes": 1_000_000,
                           "s3_source_buckets": (bucket,)})
    storage.s3_client().create_bucket(Bucket=f"{bucket}-other")
    other = f"s3://{bucket}-other/b.png"
    storage.write_bytes(other, imagegen.photo_png(5, 64, 48))
    urls = [local_corpus["private_abs"], local_corpus["fifo"], local_corpus["sparse"], local_corpus["device"],
            s3_url, other]
    t0 = time.monotonic()
    rows = _ingest(urls, str(tmp_path / "allowed"), tmp_path, opts)
    assert time.monotonic() - t0 < 60  # the FIFO did not hang the shard
    assert {u: (rows[u]["status"], reason_of(rows[u])) for u in urls} == {
        local_corpus["private_abs"]: ("ok", None),
        local_corpus["fifo"]: ("failed", "not_regular_file"),
        local_corpus["sparse"]: ("failed", "body_too_large"),
        local_corpus["device"]: ("failed", "not_regular_file"),
        s3_url: ("ok", None),  # its bucket is on the allow-list
        other: ("failed", "blocked_source"),  # another bucket is not
    }
