"""Data integrity of ingest (issue 17, items 4, 9, 10, 11): unique keys by construction, faithful 16-bit
pixels, a per-task pixel budget, normalised sources, per-row input errors, one-line list errors, and temp
folders of killed tasks cleaned."""
from __future__ import annotations

import gzip
import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from webcurate.shards.dataset import Dataset
from webcurate.shards.download import FetchOptions
from webcurate.shards.errors import InputError
from webcurate.shards.image_ops import ImageOptions, PixelBudget, process_image
from webcurate.shards.ingest import fetch_and_process, ingest_urls
from webcurate.shards.inputs import read_url_list
from webcurate.shards.keys import make_key, unique_keys
from webcurate.shards.writer import DuplicateKey, ShardWriter, clean_stale_tempdirs

OPTS = FetchOptions(connect_timeout=2.0, read_timeout=2.0, total_timeout=5.0, retries=0, allow_private_addresses=True)


def reason(row: dict) -> str | None:
    return row["error"].split(":")[0] if row["error"] else None


# -- 4. keys --------------------------------------------------------------------------------

def test_keys_are_unique_by_construction_even_against_literal_suffixes():
    keys = unique_keys(["u", "u", "u#1", "u\x001"])
    assert len(set(keys)) == 4 and keys[0] == make_key("u")
    assert unique_keys(["u", "u", "u#1"]) == keys[:3]  # depends only on the list
    assert make_key("v") not in unique_keys(["v"], used={make_key("v")})  # appending avoids taken keys


def test_the_writer_refuses_a_second_member_with_the_same_key(tmp_path):
    w = ShardWriter(str(tmp_path / "ds"), 0)
    try:
        w.add("k", b"\xff\xd8x", "jpg", {"source": "a"})
        with pytest.raises(DuplicateKey):
            w.add("k", b"\xff\xd8y", "jpg", {"source": "b"})
    finally:
        w.cleanup()


def test_repeated_and_suffixed_urls_get_distinct_keys_and_a_readable_tar(image_server, ray_local, tmp_path):
    u = image_server.url("/good/1.jpg")
    (tmp_path / "list.csv").write_bytes(
        b"url,caption\n" + f"{u},a\n{u},b\n{u}#1,c\n".encode()
        + f"  HTTP://127.0.0.1:{image_server.port}/good/2.jpg  ,d\n".encode()  # scheme case and whitespace
        + f"{image_server.url('/good/3.jpg')},".encode() + b"caf\xe9 not utf-8\n")
    out = str(tmp_path / "ds")
    ingest_urls(str(tmp_path / "list.csv"), out, fetch_opts=OPTS, dedup=False, summary=False)
    rows = Dataset(out).index().to_pylist()
    assert [(r["status"], reason(r)) for r in rows] == [("ok", None)] * 4 + [("failed", "bad_caption")]
    assert len({r["key"] for r in rows}) == 5
    assert rows[3]["source"] == image_server.url("/good/2.jpg")  # normalised, not invalid_url
    with tarfile.open(os.path.join(out, "shards", "00000.tar")) as tar:
        names = tar.getnames()
    assert len(names) == len(set(names)) == 4 * 3  # jpg + json + txt per ok sample, no repeated member
    assert image_server.hits["/good/3.jpg"] == 0  # a row with a bad caption is not fetched


def test_list_typed_captions_in_parquet_are_failure_rows_not_a_traceback(tmp_path):
    pq.write_table(pa.table({"url": ["http://h/1.jpg", "http://h/2.jpg"], "caption": [["a", "b"], None]}),
                   tmp_path / "l.parquet")
    t = read_url_list(str(tmp_path / "l.parquet"))
    assert t["_input_error"].to_pylist() == ["bad_caption: a list, not text", None]


def test_a_truncated_gz_list_is_one_line_naming_the_file(tmp_path):
    data = gzip.compress(b"url\n" + b"http://h/x.jpg\n" * 1000)
    (tmp_path / "urls.csv.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as e:
        read_url_list(str(tmp_path / "urls.csv.gz"))
    assert "urls.csv.gz" in str(e.value) and "\n" not in str(e.value)


# -- 9. 16-bit PNG --------------------------------------------------------------------------

def test_a_dark_16_bit_png_stays_dark():
    arr = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) % 201)  # max 200 of 65535
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    out = process_image(buf.getvalue(), ImageOptions())
    assert np.asarray(Image.open(io.BytesIO(out.data))).mean() < 2  # 200/65535 of white, not rescaled to 255


# -- 10. pixels per task ----------------------------------------------------------------------

def test_decoded_pixels_per_task_stay_within_the_budget(image_server, tmp_path):
    # Eight small-on-the-wire 3000x2000 PNGs on eight threads, a budget of 1.5 images: never two decoded at once.
    rows = []
    for i in range(8):
        buf = io.BytesIO()
        Image.new("RGB", (3000, 2000), (30 * i, 10, 200)).save(buf, format="PNG")
        rows.append({"source": image_server.add_file(f"/flat/{i}.png", buf.getvalue())})
    opts = ImageOptions(max_task_pixels=int(1.5 * 3000 * 2000))
    results, stats = fetch_and_process(rows, None, opts, OPTS, threads=8)
    assert [e for _, e in results] == [None] * 8
    assert 3000 * 2000 <= stats["peak_pixels"] <= opts.max_task_pixels


def test_the_budget_lets_an_oversized_image_run_alone():
    b = PixelBudget(100)
    with b.hold(10_000):  # larger than the whole budget: capped, so it still runs
        assert b.used == 100
    assert b.used == 0


# -- 11. temp folders -------------------------------------------------------------------------

def test_temp_folders_of_killed_tasks_are_cleaned_and_live_ones_kept(tmp_path):
    tmp = str(tmp_path)
    dead = os.path.join(tmp, "webcurate-shard00003-999999999-abc")  # no such PID
    live = os.path.join(tmp, f"webcurate-shard00004-{os.getpid()}-def")
    for d in (dead, live):
        os.makedirs(d)
        open(os.path.join(d, "shard.tar"), "wb").write(b"x" * 100)
    assert clean_stale_tempdirs(tmp) == 1
    assert not os.path.exists(dead) and os.path.exists(live)
