"""`--retry-failed` rewrites only what failed, and `--append` adds only what is new (issue 16.2)."""
from __future__ import annotations

import os
import tarfile
import zlib

from webcurate.shards import manifest as manifest_mod
from webcurate.shards.append import append_urls
from webcurate.shards.dataset import Dataset
from webcurate.shards.download import FetchOptions
from webcurate.shards.ingest import ingest_urls
from webcurate.shards.retry_failed import DEFAULT_REASONS, matches, retry_failed

ONCE = FetchOptions(connect_timeout=2.0, read_timeout=3.0, total_timeout=6.0, retries=0,
                    allow_private_addresses=True)


def members(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_reasons_match_by_family():
    assert matches("http_503: Service Unavailable", DEFAULT_REASONS) and matches("timeout: x", DEFAULT_REASONS)
    assert not matches("http_404: Not Found", DEFAULT_REASONS) and not matches("opted_out: x", DEFAULT_REASONS)
    assert matches("http_404: gone", ("http_4xx",)) and matches("not_an_image: x", ("all",))


def test_retry_failed_rewrites_only_the_failed_rows(image_server, ray_local, tmp_path):
    dup_seed = zlib.crc32(b"dupe") % 1000 + 500  # the picture /flaky/1/dupe.jpg serves once it answers
    urls = [image_server.url("/good/30.jpg"), image_server.url("/flaky/1/a.jpg"), image_server.url("/good/31.jpg"),
            image_server.url("/status/404/gone.jpg"), image_server.url(f"/good/{dup_seed}.jpg"),
            image_server.url("/flaky/1/dupe.jpg"),
            image_server.url("/good/32.jpg"), image_server.url("/good/33.jpg")]
    (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
    out = str(tmp_path / "ds")
    ingest_urls(str(tmp_path / "urls.txt"), out, shard_size=3, workers=2, fetch_opts=ONCE, summary=False)
    before = Dataset(out).index().to_pylist()
    assert [r["status"] for r in before] == ["ok", "failed", "ok", "failed", "ok", "failed", "ok", "ok"]
    tars = {s: members(os.path.join(out, "shards", f"{s:05d}.tar")) for s in range(3)}
    untouched = os.stat(os.path.join(out, "index", "00002.parquet")).st_mtime_ns

    record = retry_failed(out, DEFAULT_REASONS, workers=2, fetch_opts=ONCE, summary=False)
    after = Dataset(out).index().to_pylist()
    assert [r["key"] for r in after] == [r["key"] for r in before]  # keys unchanged
    assert [r["status"] for r in after] == ["ok", "ok", "ok", "failed", "ok", "duplicate", "ok", "ok"]
    assert after[5]["duplicate_of"] == before[4]["key"]  # recovered, but the same picture as an older row
    for i in (0, 2, 3, 4, 6, 7):
        assert after[i] == before[i], i  # every other row exactly as it was
    new0 = members(os.path.join(out, "shards", "00000.tar"))
    assert {n: b for n, b in new0.items() if not n.startswith(before[1]["key"])} == tars[0]  # copied byte for byte
    assert f"{before[1]['key']}.jpg" in new0
    assert os.stat(os.path.join(out, "index", "00002.parquet")).st_mtime_ns == untouched  # no failure: not rewritten
    assert record["retried"] == 2 and record["recovered"] == 2 and record["duplicates"] == 1 and record["shards"] == [0, 1]
    m = manifest_mod.load(out)
    assert m["retries"][-1]["reasons"] == list(DEFAULT_REASONS) and m["counts"]["ok"] == 6
    assert image_server.hits["/status/404/gone.jpg"] == 1  # a 404 is not among the reasons


def test_append_adds_new_urls_as_new_shards_and_skips_known_ones(image_server, ray_local, tmp_path):
    first = [image_server.url(f"/good/{40 + i}.jpg") for i in range(4)]
    (tmp_path / "a.txt").write_text("\n".join(first) + "\n")
    out = str(tmp_path / "ds")
    ingest_urls(str(tmp_path / "a.txt"), out, shard_size=2, workers=2, fetch_opts=ONCE, summary=False)
    old = {f"{sub}/{n}": open(os.path.join(out, sub, n), "rb").read() for sub in ("shards", "index")
           for n in os.listdir(os.path.join(out, sub))}
    more = first[1:3] + [image_server.url(f"/good/{50 + i}.jpg") for i in range(3)]
    (tmp_path / "b.txt").write_text("\n".join(more) + "\n")
    hits = dict(image_server.hits)

    r = append_urls(str(tmp_path / "b.txt"), out, fetch_opts=ONCE, workers=2, summary=False)
    assert r.already_present == 2 and r.num_shards == 2
    assert {p: image_server.hits[p] for p in hits} == hits  # known URLs were not fetched again
    ds = Dataset(out)
    assert ds.completed_shards() == [0, 1, 2, 3]
    assert {n: open(os.path.join(out, n), "rb").read() for n in old} == old  # the old shards untouched
    rows = ds.index().to_pylist()
    assert [r["source"] for r in rows] == first + more[2:]
    assert len({r["key"] for r in rows}) == 7 and {r["status"] for r in rows} == {"ok"}
    # The same append again has nothing left to do.
    hits = sum(image_server.hits.values())
    again = append_urls(str(tmp_path / "b.txt"), out, fetch_opts=ONCE, workers=2, summary=False)
    assert again.shards_written == 0 and sum(image_server.hits.values()) == hits
    assert manifest_mod.load(out)["appends"][0]["added"] == 3
