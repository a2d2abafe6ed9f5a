"""`webcurate shard` as users run it (a subprocess with its own local Ray):
folder input with labels, URL list and output on S3, resume after SIGKILL of
the driver, one-line errors for bad input; and adopting an img2dataset layout.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from webcurate.shards import manifest as manifest_mod, storage
from webcurate.shards.adopt import adopt
from webcurate.shards.dataset import Dataset
from webcurate.shards.download import FetchOptions
from webcurate.shards.ingest import ingest_urls
from webcurate.shards.keys import make_key, unique_keys


def webcurate_cmd() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "webcurate")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "webcurate.pipeline.cli"]


def cli_env() -> dict[str, str]:
    env = dict(os.environ, WEBCURATE_QUIET="1", RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)  # each run starts its own local Ray, as a user's would
    return env


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(webcurate_cmd() + list(args), capture_output=True, text=True, timeout=timeout,
                          env=cli_env())


def files_of(root: str) -> dict[str, bytes]:
    """Every shard tar and index parquet under ``root`` by relative name (temp files excluded)."""
    out = {}
    for sub in ("shards", "index"):
        d = os.path.join(root, sub)
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if ".tmp-" not in name:
                out[f"{sub}/{name}"] = open(os.path.join(d, name), "rb").read()
    return out


# -- folder input ---------------------------------------------------------------

def test_folder_with_labels_from_dirs(image_folder, imagegen, tmp_path):
    # Nesting below the class folder, a caption file, and a non-image file to ignore.
    (image_folder / "dog" / "puppies").mkdir()
    (image_folder / "dog" / "puppies" / "p1.png").write_bytes(imagegen.photo_png(5, 300, 200))
    (image_folder / "cat" / "000.txt").write_text("a cat on a mat\n")
    (image_folder / "fish" / "notes.md").write_text("not an image")
    out = str(tmp_path / "ds")
    r = run_cli("shard", "--input", str(image_folder), "--output", out, "--labels-from-dirs", "--shard-size", "5",
                "--image-size", "128")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote 3 shard(s)" in r.stdout and "13 ok" in r.stdout
    ds = Dataset(out)
    index = ds.index().to_pylist()
    rels = sorted(str(p.relative_to(image_folder)) for p in image_folder.rglob("*")
                  if p.suffix in (".jpg", ".png"))
    assert [row["source"] for row in index] == rels
    assert [row["key"] for row in index] == unique_keys(rels)
    assert [row["label"] for row in index] == [rel.split("/")[0] for rel in rels]
    assert {row["status"] for row in index} == {"ok"}
    samples = {s.key: s for shard in ds.completed_shards() for s in ds.iter_samples(shard)}
    assert len(samples) == 13
    cat0 = samples[make_key("cat/000.jpg")]
    assert cat0.meta["label"] == "cat" and cat0.caption == "a cat on a mat"
    puppy = samples[make_key("dog/puppies/p1.png")]
    assert puppy.meta["label"] == "dog" and puppy.ext == "jpg"
    assert Image.open(io.BytesIO(puppy.image)).size == (192, 128)  # keep_ratio to 128
    assert ds.manifest["parameters"]["labels_from_dirs"] is True


def test_bad_input_is_one_clear_line_not_a_traceback(tmp_path):
    r = run_cli("shard", "--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "ds"), timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "nowhere" in r.stderr
    lst = tmp_path / "list.csv"
    lst.write_text("link,text\nhttp://127.0.0.1:9/a.jpg,x\n")
    r = run_cli("shard", "--input", str(lst), "--output", str(tmp_path / "ds2"), timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "'url'" in r.stderr and "--url-col" in r.stderr
    r = run_cli("shard", "--input", str(tmp_path), "--adopt", "--output", str(tmp_path / "elsewhere"), timeout=60)
    assert r.returncode == 2 and "in place" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


# -- S3 ---------------------------------------------------------------------------

def test_url_list_and_output_on_s3(image_server, imagegen, ray_local, s3_bucket, tmp_path):
    # A subprocess, as users run it: its Ray workers inherit the S3 endpoint and credentials.
    lines = [{"url": image_server.url(f"/good/{80 + i}-{400 + i}x300.jpg"), "caption": f"c{i}"} for i in range(6)]
    lines.append({"url": image_server.url("noai"), "caption": "no"})
    list_uri = f"{s3_bucket}/lists/urls.jsonl.gz"
    storage.write_bytes(list_uri, gzip.compress("".join(json.dumps(x) + "\n" for x in lines).encode(), mtime=0))
    out = f"{s3_bucket}/datasets/web"
    r = run_cli("shard", "--input", list_uri, "--output", out, "--shard-size", "4", "--workers", "2",
                "--allow-private-addresses")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "6 ok" in r.stdout and "1 opted out" in r.stdout
    ds = Dataset(out)
    assert ds.completed_shards() == [0, 1]
    index = ds.index().to_pylist()
    assert [x["status"] for x in index] == ["ok"] * 6 + ["opted_out"]
    samples = [s for shard in ds.completed_shards() for s in ds.iter_samples(shard)]
    assert [s.caption for s in samples] == [f"c{i}" for i in range(6)]
    assert Image.open(io.BytesIO(samples[0].image)).size == (341, 256)
    # Re-running finds every shard done: nothing fetched, no object rewritten.
    objects = {e.name: storage.read_bytes(e.uri) for sub in ("shards", "index")
               for e in storage.list_dir(storage.join(out, sub))}
    hits = sum(image_server.hits.values())
    ingest_urls(list_uri, out, shard_size=4, workers=2, summary=False,
                fetch_opts=FetchOptions(allow_private_addresses=True))
    assert sum(image_server.hits.values()) == hits
    assert {e.name: storage.read_bytes(e.uri) for sub in ("shards", "index")
            for e in storage.list_dir(storage.join(out, sub))} == objects


# -- resume after SIGKILL ---------------------------------------------------------

SHARD_SIZE = 8
NUM_SHARDS = 6


def _gated_list(server, path) -> list[str]:
    """Shard 0 is served at once; every later URL waits at the server's gate, which the test
    opens only after the kill, so the run is certainly still busy when shard 0 is recorded."""
    urls = []
    for i in range(SHARD_SIZE * NUM_SHARDS):
        gate = "" if i < SHARD_SIZE else "/gate"
        urls.append(server.url(f"{gate}/good/{200 + i}-{320 + 3 * i}x{240 + 2 * i}.jpg"))
    urls[-1] = server.url("/gate/status/404/gone.jpg")  # failures resume too
    urls[-2] = server.url(f"/gate/dup/x/{200 + 3}-{320 + 9}x{240 + 6}.jpg")  # same picture as urls[3]
    pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}), path)
    return urls


def _wait_gone(pgid: int, timeout: float = 60) -> None:
    """Until no process of group ``pgid`` (the killed driver's session: its Ray) is left."""
    deadline = time.time() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.time() < deadline, "the killed run's processes did not go away"
        time.sleep(0.05)


def _recorded(root: str) -> list[int]:
    return manifest_mod.completed_ids(root) if manifest_mod.load(root) else []


def test_resume_after_sigkill_gives_the_uninterrupted_bytes(http_server_mod, ray_local, tmp_path):
    with http_server_mod.ImageServer() as server:
        urls = _gated_list(server, tmp_path / "urls.parquet")
        # A read timeout longer than the test's wait for shard 0: gated requests never time out.
        args = ["shard", "--input", str(tmp_path / "urls.parquet"), "--shard-size", str(SHARD_SIZE),
                "--workers", "2", "--timeout", "120", "--total-timeout", "240", "--retries", "0",
                "--allow-private-addresses"]
        killed = str(tmp_path / "killed")

        # 1. Start, wait until shard 0 is recorded in the manifest, SIGKILL the driver.
        proc = subprocess.Popen(webcurate_cmd() + args + ["--output", killed], env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            deadline = time.time() + 180
            while 0 not in _recorded(killed):
                assert proc.poll() is None, f"run ended before the kill: {proc.stderr.read()[-2000:]}"
                assert time.time() < deadline, "shard 0 never completed"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            # The driver's local Ray (raylet, workers) went with it; make sure nothing of it
            # keeps writing while we look (only the session this test started).
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.stderr.close()
        _wait_gone(proc.pid)  # nothing of the killed run writes while we look
        done_at_kill = _recorded(killed)
        assert 0 in done_at_kill and len(done_at_kill) < NUM_SHARDS, done_at_kill
        hits_before = sum(server.hits.values())
        shard0_paths = {u.split(str(server.port), 1)[1] for u in urls[:SHARD_SIZE]}
        shard0_hits = {p: server.hits[p] for p in shard0_paths}

        # 2. The same command again finishes the job, skipping what was recorded.
        server.gate.set()
        resumed = run_cli(*args, "--output", killed)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert {p: server.hits[p] for p in shard0_paths} == shard0_hits  # shard 0 not fetched again
        assert sum(server.hits.values()) > hits_before

        # 3. An uninterrupted run of the same inputs (in-process: same code path as the
        #    CLI minus a Ray start-up; fetch options do not enter the written bytes).
        ref = str(tmp_path / "ref")
        ingest_urls(str(tmp_path / "urls.parquet"), ref, shard_size=SHARD_SIZE, workers=2, summary=False,
                    fetch_opts=FetchOptions(allow_private_addresses=True))

    got, want = files_of(killed), files_of(ref)
    assert sorted(got) == sorted(want) and len(want) == 2 * NUM_SHARDS
    different = [name for name in want if got[name] != want[name]]
    assert not different, f"not byte-identical after resume: {different}"
    keys = Dataset(killed).index(columns=["key"])["key"].to_pylist()
    assert sorted(keys) == sorted(make_key(u) for u in urls) and len(keys) == len(set(keys))
    assert Dataset(killed).manifest["completed_shards"] == list(range(NUM_SHARDS))
    idx = {r["source"]: r for r in Dataset(killed).index().to_pylist()}
    assert idx[urls[-2]]["status"] == "duplicate" and idx[urls[-1]]["error"].startswith("http_404")


# -- adopting an img2dataset folder ----------------------------------------------

def _img2dataset_shard(folder, shard: int, n_ok: int, imagegen) -> list[dict]:
    """Write ``{shard:05d}.tar`` + ``.parquet`` + ``_stats.json`` the way img2dataset does."""
    rows = []
    tar_path = folder / f"{shard:05d}.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(n_ok + 1):
            key = f"{shard:05d}{i:04d}"
            url = f"https://example.com/{shard}/{i}.jpg"
            if i == n_ok:  # the last one failed to download: only in the parquet
                rows.append({"key": key, "url": url, "caption": f"failed {i}", "status": "failed_to_download",
                             "error_message": "HTTP Error 404: Not Found", "width": None, "height": None})
                continue
            img = imagegen.photo_jpeg(1000 * shard + i, 256, 192)
            meta = {"url": url, "caption": f"photo {shard}-{i}", "key": key, "status": "success",
                    "error_message": None, "width": 256, "height": 192, "original_width": 512,
                    "original_height": 384, "exif": "{}", "sha256": hashlib.sha256(img).hexdigest()}
            for ext, data in (("jpg", img), ("txt", meta["caption"].encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            rows.append({k: meta[k] for k in ("key", "url", "caption", "status", "error_message", "width", "height")})
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps(
        {"count": n_ok + 1, "successes": n_ok, "failed_to_download": 1, "failed_to_resize": 0,
         "status_dict": {"success": n_ok, "failed_to_download": 1}}))
    return rows


def test_adopt_img2dataset_layout_in_place_without_rewriting(imagegen, ray_local, tmp_path):
    folder = tmp_path / "i2d"
    folder.mkdir()
    rows = _img2dataset_shard(folder, 0, 3, imagegen) + _img2dataset_shard(folder, 1, 2, imagegen)
    tars_before = {p.name: p.read_bytes() for p in folder.glob("*.tar")}
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.tar")}
    # In-process (the CLI's --adopt calls exactly this); saves a Ray start-up.
    adopt(str(folder), workers=2, summary=False)
    assert {p.name: p.read_bytes() for p in folder.glob("*.tar")} == tars_before
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.tar")} == stamps  # not even rewritten
    ds = Dataset(str(folder))
    assert ds.manifest["stage"] == "adopt" and ds.completed_shards() == [0, 1]
    index = {row["key"]: row for row in ds.index().to_pylist()}
    assert set(index) == {row["key"] for row in rows}  # every upstream row, ok or failed
    for row in rows:
        got = index[row["key"]]
        assert got["source"] == row["url"] and got["caption"] == row["caption"]
        if row["status"] == "success":
            assert got["status"] == "ok" and (got["width"], got["height"]) == (256, 192)
            assert (got["original_width"], got["original_height"]) == (512, 384)
        else:
            assert got["status"] == "failed" and "failed_to_download" in got["error"]
    samples = [s for shard in ds.completed_shards() for s in ds.iter_samples(shard)]
    assert [s.key for s in samples] == [row["key"] for row in rows if row["status"] == "success"]
    assert samples[0].caption == "photo 0-0"
    # Adopting again is a no-op that keeps the index as it is.
    index_bytes = {p.name: p.read_bytes() for p in (folder / "index").iterdir()}
    adopt(str(folder), summary=False)
    assert {p.name: p.read_bytes() for p in (folder / "index").iterdir()} == index_bytes
