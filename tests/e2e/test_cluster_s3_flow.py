"""The whole flow on a real 2-node Ray cluster with a real S3 endpoint, both on 127.0.0.1.

shard a URL list (itself on S3) served on loopback into s3:// → curate from
s3:// → train 2 workers reading s3:// with checkpoints to s3:// → label →
every key's journey checked in the indices. A second test kills the worker
node in the middle of the shard stage and checks that a re-run loses and
duplicates nothing.
"""
from __future__ import annotations

import io
import pathlib
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from helpers import load_helper
from webcurate.pipeline.demo_corpus import LoopbackServer
from webcurate.shards import Dataset, storage
from webcurate.shards.keys import make_key

HERE = pathlib.Path(__file__).parent
WEBCURATE = str(pathlib.Path(sys.executable).parent / "webcurate")

pytestmark = pytest.mark.slow


def _photos(folder: pathlib.Path, n: int, size: int = 64) -> list[str]:
    """n smooth random colour photos as JPEG files; two classes by colour cast."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
        small[..., i % 2] = 255  # class 0 is reddish, class 1 greenish
        img = Image.fromarray(small.astype(np.uint8)).resize((size, size), Image.BICUBIC)
        name = f"p{i:04d}.jpg"
        img.save(folder / name, quality=90)
        names.append(name)
    return names


def _url_list_on_s3(bucket: str, base_url: str, names: list[str], broken: int = 2) -> tuple[str, list[str]]:
    urls = [f"{base_url}/{n}" for n in names] + [f"{base_url}/missing{j}.jpg" for j in range(broken)]
    captions = [("a red thing" if int(n[1:5]) % 2 == 0 else "a green thing") for n in names] + [None] * broken
    buf = io.BytesIO()
    pq.write_table(pa.table({"url": urls, "caption": captions}), buf)
    uri = f"{bucket}/inputs/urls.parquet"
    storage.write_bytes(uri, buf.getvalue())
    return uri, urls


LFS = '''
from webcurate.curation.labeling import ABSTAIN, labeling_function

CLASSES = ["red", "green"]

@labeling_function()
def caption_colour(x):
    c = (x.caption or "").lower()
    return 0 if "red" in c else 1 if "green" in c else ABSTAIN

@labeling_function()
def pixels_colour(x):
    return ABSTAIN
'''


def _env(cluster, s3_server: str) -> dict[str, str]:
    env = cluster.env()
    env.update(AWS_ENDPOINT_URL=s3_server, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_REGION="us-east-1", WEBCURATE_QUIET="1")
    return env


def test_shard_curate_train_label_on_two_nodes_and_s3(tmp_path, s3_bucket, s3_server):
    ray_cluster = load_helper(HERE / "ray_cluster.py")
    names = _photos(tmp_path / "web", 48)
    (tmp_path / "lfs.py").write_text(LFS)
    with LoopbackServer(str(tmp_path / "web")) as server, \
            ray_cluster.local_ray_cluster(num_nodes=2, cpus_per_node=1, dashboard=False,
                                          extra_env={"AWS_ENDPOINT_URL": s3_server,
                                                     "AWS_ACCESS_KEY_ID": "testing",
                                                     "AWS_SECRET_ACCESS_KEY": "testing"}) as cluster:
        url_list, urls = _url_list_on_s3(s3_bucket, server.url, names)
        pipeline = {
            "shard": {"input": url_list, "output": f"{s3_bucket}/raw", "shard_size": 16, "image_size": 64,
                      "threads": 4, "retries": 0, "allow_private_addresses": True},
            "curate": {"output": f"{s3_bucket}/curated",
                       "embed": {"model": "vit_tiny_patch16_224", "random_init": True, "image_size": 32,
                                 "batch_size": 16},
                       "dedup": {"method": "exact"},
                       "cluster": {"levels": [4, 2], "resampling_steps": 1},
                       "sample": {"target": 40}, "report": False},
            "train": {"output": f"{s3_bucket}/runs/tiny", "max_steps": 4, "overrides": [
                "model.name=vit_tiny_patch16_224", "model.patch_size=8", "model.embed_dim=48", "model.depth=1",
                "model.num_heads=2", "dino.n_prototypes=64", "dino.hidden_dim=64", "dino.bottleneck_dim=32",
                "ibot.separate_head=false", "loader.global_size=32", "loader.local_size=16", "loader.n_local=2",
                "loader.batch_size=4", "loader.num_threads=1", "run.num_workers=2", "run.cpus_per_worker=0.5",
                "run.checkpoint_every=2", "run.report_every=2", "run.log_every=1"]},
            "label": {"lfs": str(tmp_path / "lfs.py"), "output": f"{s3_bucket}/labelled"},
        }
        cfg_path = tmp_path / "pipeline.yaml"
        cfg_path.write_text(yaml.safe_dump(pipeline))
        proc = subprocess.run([WEBCURATE, "run", str(cfg_path)], env=_env(cluster, s3_server),
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        assert "testing" not in proc.stdout + proc.stderr  # the secret never reaches the logs
        # The same command again finds every step complete and redoes none of them.
        again = subprocess.run([WEBCURATE, "run", str(cfg_path)], env=_env(cluster, s3_server),
                               capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
        table = again.stdout[again.stdout.rfind("pipeline"):]
        outcomes = {cells[0]: cells[1] for cells in
                    ([c.strip() for c in ln.strip("│┃ ").split("│")] for ln in table.splitlines() if "│" in ln)
                    if len(cells) > 1}
        for step in ("shard", "curate", "train", "label"):
            assert outcomes.get(step, "").startswith("complete"), f"re-run redid `{step}`:\n{table}"

    # Every URL is exactly one index row, keyed by its URL.
    raw = Dataset(f"{s3_bucket}/raw")
    idx = raw.index(columns=["key", "source", "status"]).to_pydict()
    assert sorted(idx["source"]) == sorted(urls)
    assert idx["key"] == [make_key(s) for s in idx["source"]]
    status = dict(zip(idx["source"], idx["status"]))
    assert [u for u in urls if status[u] != "ok"] == [u for u in urls if "missing" in u]
    ok = {k for k, s in zip(idx["key"], idx["status"]) if s == "ok"}

    curated = Dataset(f"{s3_bucket}/curated")
    assert curated.manifest["parent"] == f"{s3_bucket}/raw"
    cur_keys = set(curated.ok_keys())
    assert len(cur_keys) == 40 and cur_keys <= ok

    # Training read s3:// and wrote checkpoints and the backbone there.
    run_files = [e.name for e in storage.list_dir(f"{s3_bucket}/runs/tiny", recursive=True)]
    assert "backbone.safetensors" in run_files
    assert any("checkpoint" in n for n in run_files)

    # Curation's sidecars under the raw dataset: every ok key embedded, the sample is the curated set.
    emb_keys = set(raw.read_sidecar("embeddings", columns=["key"]).column("key").to_pylist())
    assert emb_keys == ok
    sample = raw.read_sidecar("sample", columns=["key", "selected"]).to_pydict()
    assert {k for k, sel in zip(sample["key"], sample["selected"]) if sel} == cur_keys

    labelled = Dataset(f"{s3_bucket}/labelled")
    assert labelled.manifest["parent"] == f"{s3_bucket}/curated"
    lab_keys = set(labelled.ok_keys())
    assert lab_keys and lab_keys <= cur_keys
    table = pq.read_table(pa.BufferReader(storage.read_bytes(f"{s3_bucket}/labelled/pseudo_labels.parquet")))
    assert set(table.column("key").to_pylist()) == cur_keys, "every curated key has a pseudo-label row"
    seen = 0
    for shard in labelled.completed_shards():
        for s in labelled.iter_samples(shard):
            want = "red" if "red" in s.meta["caption"] else "green"
            assert s.meta["label"] == want, (s.key, s.meta)
            seen += 1
    assert seen == len(lab_keys)


def _completed(uri: str) -> list[int]:
    import json

    if not storage.exists(uri):
        return []
    return json.loads(storage.read_bytes(uri)).get("completed_shards", [])


def test_killing_the_worker_node_mid_shard_loses_and_duplicates_nothing(tmp_path, s3_bucket, s3_server):
    ray_cluster = load_helper(HERE / "ray_cluster.py")
    http = load_helper(HERE.parent / "shards" / "http_server.py")
    aws = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    with http.ImageServer() as server, \
            ray_cluster.local_ray_cluster(num_nodes=2, cpus_per_node=1, dashboard=False, extra_env=aws) as cluster:
        # Each image takes 0.3 s to arrive, so every 4-image shard task lasts over a second.
        urls = [server.url(f"/slow/300/good/{i}-48x48.jpg") for i in range(60)]
        buf = io.BytesIO()
        pq.write_table(pa.table({"url": urls}), buf)
        url_list = f"{s3_bucket}/inputs/slow.parquet"
        storage.write_bytes(url_list, buf.getvalue())
        out = f"{s3_bucket}/killed"
        cmd = [WEBCURATE, "shard", "--input", url_list, "--output", out, "--shard-size", "4",
               "--threads", "1", "--workers", "2", "--allow-private-addresses"]  # the server is on 127.0.0.1
        env = _env(cluster, s3_server)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 180
        while time.time() < deadline and not _completed(f"{out}/_manifest.json"):
            time.sleep(0.3)
        assert _completed(f"{out}/_manifest.json"), "no shard finished before the kill"
        cluster.kill_worker()
        log, _ = proc.communicate(timeout=600)
        # Either Ray retried the lost tasks on the head, or the run failed cleanly; a re-run finishes it.
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, log[-3000:] + rerun.stdout[-3000:] + rerun.stderr[-3000:]
        # The same command, never interrupted, into another prefix: the reference bytes.
        clean = f"{s3_bucket}/clean"
        ref = subprocess.run([clean if c == out else c for c in cmd], env=env, capture_output=True, text=True,
                             timeout=600)
        assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    ds = Dataset(out)
    idx = ds.index(columns=["key", "source", "status"]).to_pydict()
    assert sorted(idx["source"]) == sorted(urls)  # none lost, none twice
    assert len(set(idx["key"])) == len(urls)
    assert set(idx["status"]) == {"ok"}
    assert ds.completed_shards() == list(range(15))
    # Tars too: every key's image exactly once, and byte-identical to the uninterrupted run.
    in_tars = [name.rsplit(".", 1)[0] for sh in ds.completed_shards()
               for name in tarfile.open(fileobj=io.BytesIO(storage.read_bytes(ds.shard_uri(sh)))).getnames()
               if name.endswith(".jpg")]
    assert sorted(in_tars) == sorted(idx["key"])
    for sub in ("shards", "index"):
        names = sorted(e.name for e in storage.list_dir(f"{out}/{sub}"))
        assert names == sorted(e.name for e in storage.list_dir(f"{s3_bucket}/clean/{sub}"))
        for name in names:
            assert storage.read_bytes(f"{out}/{sub}/{name}") == storage.read_bytes(f"{s3_bucket}/clean/{sub}/{name}"), \
                f"{sub}/{name} differs from the uninterrupted run"
