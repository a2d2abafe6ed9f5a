"""A stage's scratch files: batches read back exactly, on local disk and S3, and the folder goes away."""
from __future__ import annotations

import numpy as np
import pytest


def _batches():
    rng = np.random.default_rng(0)
    return [
        {"gid": np.arange(5, dtype=np.int64), "x": rng.standard_normal((5, 7)).astype(np.float16),
         "is_q": np.array([1, 0, 1, 1, 0], bool), "pi": rng.integers(0, 99, (5, 3)).astype(np.int32),
         "key": np.array(["a", "b", "c", "d", "e"], dtype=object)},
        {"gid": np.zeros(0, np.int64), "x": np.zeros((0, 7), np.float16), "is_q": np.zeros(0, bool),
         "pi": np.zeros((0, 3), np.int32), "key": np.array([], dtype=object)},
    ]


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype or a[k].dtype == object, k
        assert a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("where", ["local", "s3"])
def test_each_batch_reads_back_with_its_dtypes_and_shapes(where, tmp_path, request):
    from webcurate.curation import scratch

    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    with scratch.Scratch(root, "t") as tmp:
        uri = tmp.file("w0", "000000.arrow")
        assert scratch.write_batches(uri, _batches()) > 0
        for j, want in enumerate(_batches()):
            _same(scratch.read_batch(uri, j), want)
        assert [len(b["gid"]) for b in scratch.read_batches([uri, uri], 1)] == [], "empty batches are skipped"
        assert [len(b["gid"]) for b in scratch.read_batches([uri, uri], 0)] == [5, 5]


def test_the_folder_is_removed_when_the_stage_fails(tmp_path):
    from webcurate.curation import scratch
    from webcurate.shards import storage

    with pytest.raises(RuntimeError):
        with scratch.Scratch(str(tmp_path), "t") as tmp:
            scratch.write_batches(tmp.file("a.arrow"), _batches())
            raise RuntimeError("a task failed")
    assert storage.list_dir(str(tmp_path / scratch.SCRATCH_DIR)) == []


def test_waves_split_only_when_the_local_disk_is_short(tmp_path, s3_bucket):
    from webcurate.curation import scratch

    assert scratch.waves(str(tmp_path), 10, 1e6) == [list(range(10))]
    short = scratch.waves(str(tmp_path), 10, 1e6, disk_share=1e-9)  # a disk with ~free x 1e-9 bytes to give
    assert len(short) > 1 and sorted(g for w in short for g in w) == list(range(10))
    assert scratch.waves(s3_bucket, 10, 1e15) == [list(range(10))], "S3 has room for one wave"
