"""Completion as one object per shard and stage (shards/manifest.py), not a manifest rewrite per shard.

Two stages of one dataset running at the same time both keep every part they
finished; 10,000 shards record and list quickly; a parameter change starts a
new run whose completion starts empty; the manifest summarises the objects.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pyarrow as pa

from webcurate.shards import layout, manifest
from webcurate.shards.dataset import Dataset
from webcurate.shards.writer import write_parquet


def _dataset(root: str, shards: int, rows: int = 3) -> None:
    """A dataset of ``shards`` index files (no tars: the stages below only read the index)."""
    manifest.save(root, manifest.new("test", {"shards": shards}, None, shards))
    for s in range(shards):
        keys = [f"k{s}_{i}" for i in range(rows)]
        write_parquet(layout.index_uri(root, s), pa.table({"key": keys, "status": ["ok"] * rows}))
    m = manifest.load(root)
    m["completed_shards"] = list(range(shards))
    manifest.save(root, m)


def count_rows(shard: int, root: str, stage: str, delay: float) -> dict:
    """A per-shard sidecar task: one row per index row, written atomically (slow on purpose)."""
    ds = Dataset(root)
    keys = ds.read_index(shard, columns=["key"])["key"]
    time.sleep(delay)  # widen the window in which both stages record at once
    ds.write_sidecar(stage, shard, pa.table({"key": keys, "n": pa.array([1] * len(keys))}))
    return {"counts": {"total": len(keys)}}


def test_two_stages_running_at_once_keep_every_finished_part(tmp_path, ray_local):
    from webcurate.shards.stage import run_sidecar_stage

    root = str(tmp_path / "ds")
    _dataset(root, 12)
    errors: list[BaseException] = []

    def run(stage: str) -> None:
        try:
            run_sidecar_stage(Dataset(root), stage, count_rows, {"v": 1}, kwargs={"stage": stage, "delay": 0.05},
                              workers=1, summary=False)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("alpha", "beta")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    ds = Dataset(root)
    for stage in ("alpha", "beta"):
        assert ds.sidecar_completed(stage) == list(range(12)), stage
    m = manifest.summarize(root)
    assert {s: m["stages"][s]["counts"]["total"] for s in ("alpha", "beta")} == {"alpha": 36, "beta": 36}


_RECORDER = """
import sys
from webcurate.shards import manifest
root, stage, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
manifest.record_stage(root, stage, {"who": stage})
for s in range(n):
    manifest.record_shard(root, s, {"counts": {"total": 1}}, stage=stage)
manifest.record_stage(root, stage, {"who": stage}, finished="now")
"""


def test_concurrent_recorders_in_separate_processes_lose_nothing(tmp_path):
    root = str(tmp_path / "ds")
    manifest.save(root, manifest.new("test", {}, None, 300))
    procs = [subprocess.Popen([sys.executable, "-c", _RECORDER, root, stage, "300"]) for stage in ("a", "b", "c")]
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    for stage in ("a", "b", "c"):
        assert manifest.completed_ids(root, stage) == list(range(300))
    m = manifest.summarize(root)
    assert all(m["stages"][s]["completed_shards"] == list(range(300)) for s in ("a", "b", "c"))


def test_ten_thousand_shards_record_and_list_without_touching_the_manifest(tmp_path, capsys):
    root = str(tmp_path / "ds")
    n = 10_000
    manifest.save(root, manifest.new("test", {}, None, n))
    manifest.record_stage(root, "embeddings", {"model": "m"})
    before = os.stat(manifest.manifest_uri(root)).st_mtime_ns
    t0 = time.perf_counter()
    for s in range(n):
        manifest.record_shard(root, s, {"counts": {"total": 2}}, stage="embeddings")
    t_record = time.perf_counter() - t0
    assert os.stat(manifest.manifest_uri(root)).st_mtime_ns == before, "a shard record rewrote the manifest"
    t0 = time.perf_counter()
    ids = manifest.completed_ids(root, "embeddings")
    t_list = time.perf_counter() - t0
    assert ids == list(range(n))
    t0 = time.perf_counter()
    m = manifest.record_stage(root, "embeddings", {"model": "m"}, finished=manifest.now_iso())
    t_summary = time.perf_counter() - t0
    assert m["stages"]["embeddings"]["counts"] == {"total": 2 * n}
    with capsys.disabled():
        print(f"\n10,000 shards: record {t_record:.1f} s ({t_record / n * 1e3:.2f} ms each), "
              f"list {t_list:.2f} s, summarise {t_summary:.2f} s")


def test_new_parameters_start_an_empty_run_and_a_lost_part_is_not_complete(tmp_path):
    root = str(tmp_path / "ds")
    _dataset(root, 3)
    ds = Dataset(root)
    manifest.record_stage(root, "dedup", {"k": 1})
    for s in range(3):
        ds.write_sidecar("dedup", s, pa.table({"key": ["x"]}))
        manifest.record_shard(root, s, {"counts": {"total": 1}}, stage="dedup")
    assert ds.sidecar_completed("dedup") == [0, 1, 2]
    os.unlink(ds.sidecar_uri("dedup", 1))
    assert ds.sidecar_completed("dedup") == [0, 2], "a recorded part whose file is gone must be redone"
    m = manifest.record_stage(root, "dedup", {"k": 2})
    assert ds.sidecar_completed("dedup") == [] and m["stages"]["dedup"]["completed_shards"] == []
    assert m["stages"]["dedup"]["history"][0]["parameters"] == {"k": 1}
    assert m["stages"]["dedup"]["history"][0]["completed_shards"] == [0, 1, 2]


def test_a_manifest_from_before_completion_objects_still_reads(tmp_path):
    root = str(tmp_path / "ds")
    _dataset(root, 2)
    ds = Dataset(root)
    for s in range(2):
        ds.write_sidecar("old", s, pa.table({"key": ["x"]}))
    m = manifest.load(root)
    m["stages"] = {"old": {"parameters": {"a": 1}, "completed_shards": [0, 1],
                           "shard_stats": {"00000": {"counts": {"total": 1}}, "00001": {"counts": {"total": 1}}}}}
    manifest.save(root, m)
    assert ds.sidecar_completed("old") == [0, 1]
    m = manifest.record_stage(root, "old", {"a": 1})  # same parameters: the old completion carries over
    assert ds.sidecar_completed("old") == [0, 1] and m["stages"]["old"]["counts"] == {"total": 2}
