"""`ingest_urls` against a real loopback HTTP server: every bad case, modes, stability, formats, S3.

One Ray (the ``ray_local`` fixture) serves the whole module; the bad-case
matrix is ingested once and several tests read its output.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import socket
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from webcurate.shards import storage
from webcurate.shards.dataset import Dataset
from webcurate.shards.download import USER_AGENT, FetchOptions
from webcurate.shards.ingest import ingest_urls
from webcurate.shards.keys import make_key

# Short timeouts so the bad cases cost seconds, not minutes.
# The test servers listen on 127.0.0.1: loopback is refused unless opted in.
FAST = FetchOptions(connect_timeout=2.0, read_timeout=2.0, total_timeout=6.0, retries=1, backoff=0.05,
                    max_bytes=1_000_000, allow_private_addresses=True)

# name (in BAD_CASES, or an extra path below) -> (status, reason)
EXPECTED = {
    "http_404": ("failed", "http_404"),
    "/good/42.jpg": ("ok", None),  # shard 0; its duplicate comes in shard 2
    "http_500": ("failed", "http_500"),
    "http_503_always": ("failed", "http_503"),
    "flaky_503_once": ("ok", None),
    "hang": ("failed", "timeout"),
    "header_drip": ("failed", "timeout"),  # headers a byte at a time: the total deadline ends it
    "redirect_loop": ("failed", "too_many_redirects"),
    "redirect_good": ("ok", None),
    "html_as_jpeg": ("failed", "not_an_image"),
    "truncated": ("failed", "truncated"),
    "empty": ("failed", "empty"),
    "bomb": ("failed", "decompression_bomb"),
    "cmyk": ("ok", None),
    "png16": ("ok", None),
    "gif": ("ok", None),
    "exif6": ("ok", None),
    "png_as_jpg": ("ok", None),
    "too_small": ("failed", "too_small"),
    "bad_aspect": ("failed", "bad_aspect_ratio"),
    "noai": ("opted_out", "opted_out"),
    "noimageai": ("opted_out", "opted_out"),
    "other_bot_noai": ("ok", None),  # scoped to another crawler: not for us
    "/big/2000000.jpg": ("failed", "body_too_large"),  # Content-Length over the cap
    "/big-stream/2000000.jpg": ("failed", "body_too_large"),  # no length: cut while streaming
    "/good/40-640x480.jpg": ("ok", None),
    "/dup/a/41.jpg": ("ok", None),
    "/dup/b/41.jpg": ("duplicate", "duplicate"),  # same shard as its original
    "/good/43.webp": ("ok", None),
    "/dup/c/42.jpg": ("duplicate", "duplicate"),  # a later shard than its original
}


def reason(row: dict) -> str | None:
    return row["error"].split(":")[0] if row["error"] else None


@pytest.fixture(scope="module")
def server(http_server_mod):
    with http_server_mod.ImageServer(drip_interval=0.2, hang_seconds=120) as srv:
        yield srv


@pytest.fixture(scope="module")
def refused_url():
    """A loopback port that is bound but not listening: connections are refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{s.getsockname()[1]}/x.jpg"
    s.close()


@pytest.fixture(scope="module")
def matrix(server, refused_url, ray_local, tmp_path_factory):
    """Ingest every case once (3 shards of 11); returns (urls by name, index rows by url, dataset)."""
    urls = {name: server.url(name) for name in EXPECTED}
    urls["refused"] = refused_url
    urls["ftp"] = "ftp://example.com/a.jpg"
    urls["missing"] = None  # an empty cell in the list
    names = list(urls)
    table = pa.table({
        "url": [urls[n] for n in names],
        "caption": [f"caption of {n}" for n in names],
        "license": [f"cc-{i}" for i in range(len(names))],
    })
    work = tmp_path_factory.mktemp("matrix")
    pq.write_table(table, work / "list.parquet")
    out = str(work / "ds")
    t0 = time.time()
    result = ingest_urls(str(work / "list.parquet"), out, shard_size=11, workers=2, fetch_opts=FAST, summary=False)
    seconds = time.time() - t0
    ds = Dataset(out)
    rows = ds.index().to_pylist()
    by_url = {r["source"]: r for r in rows}
    return {"urls": urls, "rows": rows, "by_url": by_url, "ds": ds, "result": result, "seconds": seconds}


def test_every_input_row_becomes_exactly_one_index_row(matrix):
    rows, urls = matrix["rows"], matrix["urls"]
    assert len(rows) == len(urls)
    assert len({r["key"] for r in rows}) == len(rows)
    assert matrix["ds"].completed_shards() == [0, 1, 2]
    # Input row i lands in shard i // shard_size, in input order.
    assert [r["shard"] for r in rows] == [i // 11 for i in range(len(urls))]
    # Keys derive from the URL alone.
    for name, url in urls.items():
        if url:
            assert matrix["by_url"][url]["key"] == make_key(url), name


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_case_gets_its_status_and_reason(matrix, name):
    row = matrix["by_url"][matrix["urls"][name]]
    status, why = EXPECTED[name]
    assert (row["status"], reason(row)) == (status, why), row["error"]


def test_unusable_urls_fail_with_a_reason(matrix):
    by_url, urls = matrix["by_url"], matrix["urls"]
    assert (by_url[urls["refused"]]["status"], reason(by_url[urls["refused"]])) == ("failed", "connection_error")
    assert reason(by_url[urls["ftp"]]) == "invalid_url"
    assert reason(by_url[""]) == "invalid_url"


def test_retries_only_for_transient_errors_and_user_agent_sent(matrix, server):
    assert server.hit_count("http_404") == 1  # a 404 is final
    assert server.hit_count("http_500") == 2  # 1 retry
    assert server.hit_count("http_503_always") == 2
    assert server.hit_count("flaky_503_once") == 2  # the retry succeeded
    assert server.hit_count("/loop/x/a") >= 2  # redirects were followed before giving up
    assert set(server.user_agents) == {USER_AGENT}


def test_duplicates_name_their_original(matrix):
    by_url, urls = matrix["by_url"], matrix["urls"]
    assert by_url[urls["/dup/b/41.jpg"]]["duplicate_of"] == make_key(urls["/dup/a/41.jpg"])
    assert by_url[urls["/dup/c/42.jpg"]]["duplicate_of"] == make_key(urls["/good/42.jpg"])
    assert by_url[urls["/dup/c/42.jpg"]]["shard"] > by_url[urls["/good/42.jpg"]]["shard"]


def test_tar_holds_ok_samples_with_metadata_and_no_failures(matrix):
    ds, rows = matrix["ds"], matrix["rows"]
    in_tar = {}
    for shard in ds.completed_shards():
        for s in ds.iter_samples(shard):
            in_tar[s.key] = s
    ok = {r["key"]: r for r in rows if r["status"] == "ok"}
    failed = {r["key"] for r in rows if r["status"] in ("failed", "opted_out")}
    assert set(ok) <= set(in_tar) and not failed & set(in_tar)
    for key, r in ok.items():
        s = in_tar[key]
        img = Image.open(io.BytesIO(s.image))
        assert s.ext == "jpg" and img.format == "JPEG" and img.mode == "RGB"
        assert img.size == (r["width"], r["height"])
        assert s.caption == r["caption"] and s.meta["source"] == r["source"]
        assert s.meta["license"] == r["license"]  # extra input columns travel with the sample
    assert ds.manifest["counts"]["ok"] == len(ok)


def _decoded(matrix, name) -> tuple[dict, np.ndarray]:
    row = matrix["by_url"][matrix["urls"][name]]
    sample = next(matrix["ds"].iter_samples(row["shard"], keys=[row["key"]]))
    return row, np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB")).astype(np.float64)


def test_exif_orientation_is_applied(matrix, imagegen):
    row, got = _decoded(matrix, "exif6")
    # Stored 320x240 with orientation 6: displayed (and ingested) as 240x320.
    assert (row["width"], row["height"]) == (240, 320)
    assert (row["original_width"], row["original_height"]) == (240, 320)
    src = Image.fromarray(imagegen.make_photo(10, (320, 240)))
    right = np.asarray(src.transpose(Image.Transpose.ROTATE_270)).astype(np.float64)
    wrong = np.asarray(src.transpose(Image.Transpose.ROTATE_90)).astype(np.float64)
    assert np.abs(got - right).mean() < 8 < np.abs(got - wrong).mean()


def test_cmyk_16bit_and_gif_become_faithful_rgb(matrix, imagegen):
    _, cmyk = _decoded(matrix, "cmyk")
    assert np.abs(cmyk - imagegen.make_photo(7)).mean() < 8  # not colour-inverted
    _, grey = _decoded(matrix, "png16")
    want = imagegen.make_photo(8).mean(axis=2)
    assert np.abs(grey[..., 0] - want).mean() < 4  # 16-bit scaled to 8-bit, not clipped
    _, gif = _decoded(matrix, "gif")
    assert np.abs(gif - imagegen.make_photo(9)).mean() < 25 < np.abs(gif - imagegen.make_photo(10)).mean()


def test_keep_ratio_resizes_shorter_side_and_never_upscales(matrix):
    big = matrix["by_url"][matrix["urls"]["/good/40-640x480.jpg"]]
    assert (big["width"], big["height"], big["original_width"], big["original_height"]) == (341, 256, 640, 480)
    small = matrix["by_url"][matrix["urls"]["/good/42.jpg"]]
    assert (small["width"], small["height"]) == (320, 240)


def test_slow_drip_is_cut_at_the_total_timeout(http_server_mod, ray_local, tmp_path):
    # Every read returns within the read timeout; only a whole-body deadline stops it.
    with http_server_mod.ImageServer(drip_interval=0.2, drip_chunk=64) as srv:
        drip_url, good_url = srv.url("drip"), srv.url("/good/1.jpg")
        (tmp_path / "list.txt").write_text(drip_url + "\n" + good_url + "\n")
        opts = FetchOptions(connect_timeout=1.0, read_timeout=1.0, total_timeout=2.0, retries=0,
                            allow_private_addresses=True)
        t0 = time.time()
        ingest_urls(str(tmp_path / "list.txt"), str(tmp_path / "ds"), fetch_opts=opts, summary=False)
        took = time.time() - t0
    rows = {r["source"]: r for r in Dataset(str(tmp_path / "ds")).index().to_pylist()}
    drip = rows[drip_url]
    assert (drip["status"], reason(drip)) == ("failed", "timeout")
    assert rows[good_url]["status"] == "ok"
    # The body would take ~20 s to arrive; the deadline is 2 s.
    assert took < 12, f"drip held the shard for {took:.1f}s despite total_timeout=2s"


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for sub in ("shards", "index"):
        for e in storage.list_dir(storage.join(root, sub)):
            out[f"{sub}/{e.name}"] = storage.read_bytes(e.uri)
    return out


def test_keys_stable_and_output_byte_identical_across_runs(server, ray_local, tmp_path):
    urls = [server.url(f"/good/{i}-{300 + 37 * i}x{260 + 11 * i}.jpg") for i in range(10)]
    urls += [server.url("http_404"), server.url("exif6"), server.url("/dup/z/3.jpg"), server.url("/good/3.jpg")]
    (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ingest_urls(str(tmp_path / "urls.txt"), a, shard_size=5, workers=2, fetch_opts=FAST, summary=False)
    ingest_urls(str(tmp_path / "urls.txt"), b, shard_size=5, workers=1, threads=3, fetch_opts=FAST, summary=False)
    ka = Dataset(a).index(columns=["key", "source"]).to_pylist()
    kb = Dataset(b).index(columns=["key", "source"]).to_pylist()
    assert ka == kb and [r["key"] for r in ka] == [make_key(u) for u in urls]
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == ["index/00000.parquet", "index/00001.parquet", "index/00002.parquet",
                          "shards/00000.tar", "shards/00001.tar", "shards/00002.tar"]
    assert fa == fb  # same inputs -> same bytes, whatever the worker/thread count


def _write_list(path, fmt: str, rows: list[dict]) -> None:
    cols = list(rows[0])
    if fmt.startswith("parquet"):
        buf = io.BytesIO()
        pq.write_table(pa.table({c: [r[c] for r in rows] for c in cols}), buf)
        data = buf.getvalue()
    elif fmt.startswith(("csv", "tsv")):
        s = io.StringIO()
        w = csv.DictWriter(s, cols, delimiter="," if fmt.startswith("csv") else "\t", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        data = s.getvalue().encode()
    else:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if fmt.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl", "csv.gz", "tsv.gz", "jsonl.gz", "parquet.gz"])
def test_url_list_formats_give_the_same_dataset(server, ray_local, tmp_path, fmt):
    rows = [{"link": server.url(f"/good/{60 + i}.jpg"), "text": f"a photo, number {i}", "site": f"s{i % 2}",
             "score": 0.5 + i} for i in range(4)]
    rows.append({"link": server.url("http_404"), "text": "gone", "site": "s0", "score": 9.5})
    path = tmp_path / f"list.{fmt}"
    _write_list(path, fmt, rows)
    out = str(tmp_path / "ds")
    ingest_urls(str(path), out, url_col="link", caption_col="text", fetch_opts=FAST, summary=False)
    index = Dataset(out).index().to_pylist()
    assert [r["source"] for r in index] == [r["link"] for r in rows]
    assert [r["caption"] for r in index] == [r["text"] for r in rows]
    assert [r["site"] for r in index] == [r["site"] for r in rows]  # other columns kept
    assert [r["score"] for r in index] == [r["score"] for r in rows]
    assert [r["status"] for r in index] == ["ok"] * 4 + ["failed"]
    sample = next(Dataset(out).iter_samples(0))
    assert sample.caption == "a photo, number 0" and sample.meta["site"] == "s0"
