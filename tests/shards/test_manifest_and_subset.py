"""Manifest bookkeeping and subset export keep lineage, counts and bytes."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from webcurate.shards import Dataset, DatasetError, manifest
from webcurate.shards.ingest import ingest_folder
from webcurate.shards.subset import write_subset


def _folder(tmp_path, n=6):
    root = tmp_path / "imgs" / "c"
    root.mkdir(parents=True)
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 255, (64, 80, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{i}.jpg")
    return tmp_path / "imgs"


def test_record_stage_restarts_completion_when_parameters_change(tmp_path):
    root = str(tmp_path / "ds")
    manifest.save(root, manifest.new("shard", {}, None, 2))
    manifest.record_stage(root, "embed", {"model": "a"})
    manifest.record_shard(root, 0, {"counts": {"total": 3}}, stage="embed")
    m = manifest.record_stage(root, "embed", {"model": "a"})
    assert m["stages"]["embed"]["completed_shards"] == [0]
    m = manifest.record_stage(root, "embed", {"model": "b"})
    assert m["stages"]["embed"]["completed_shards"] == []
    assert m["stages"]["embed"]["history"][0]["parameters"] == {"model": "a"}


def test_subset_copies_bytes_merges_fields_and_names_parent(tmp_path, ray_local):
    src = str(tmp_path / "src")
    ingest_folder(str(_folder(tmp_path)), src, shard_size=4, summary=False)
    ds = Dataset(src)
    keys = ds.ok_keys()
    chosen = {keys[0]: {"cluster": 3}, keys[5]: {"cluster": 7, "score": 0.5}}
    dst = str(tmp_path / "dst")
    m = write_subset(src, dst, chosen, stage="export", parameters={"why": "test"}, summary=False)
    assert m["parent"] == src and m["stage"] == "export"
    out = Dataset(dst)
    assert sorted(out.ok_keys()) == sorted(chosen)
    src_bytes = {s.key: s.image for sh in ds.completed_shards() for s in ds.iter_samples(sh)}
    for sh in out.completed_shards():
        for s in out.iter_samples(sh):
            assert hashlib.sha256(s.image).digest() == hashlib.sha256(src_bytes[s.key]).digest()
            assert s.meta["cluster"] == chosen[s.key]["cluster"]
    # Re-running is a no-op; a different selection into the same output is refused.
    write_subset(src, dst, chosen, stage="export", parameters={"why": "test"}, summary=False)
    with pytest.raises(DatasetError):
        write_subset(src, dst, {keys[1]: {}}, stage="export", parameters={"why": "test"}, summary=False)
