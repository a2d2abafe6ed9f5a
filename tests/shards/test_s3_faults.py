"""S3 errors (throttling, 5xx, access denied) from a real HTTP endpoint: retried when
transient, otherwise one clear error naming the object, and never a partial dataset."""
from __future__ import annotations


import pytest

from webcurate.shards import Dataset, StorageError, storage


def _statuses(proxy, method: str, part: str) -> list[int]:
    return [st for m, p, st in proxy.seen if m == method and part in p]


def test_throttled_writes_and_reads_are_retried_until_they_succeed(faulty_s3, s3_fault):
    Fault = s3_fault
    proxy, bucket = faulty_s3
    uri = storage.join(bucket, "ds", "index", "00000.parquet")
    proxy.add(Fault("PUT", "/index/00000.parquet", 503, times=2))
    storage.write_bytes(uri, b"payload")
    assert _statuses(proxy, "PUT", "/index/00000.parquet") == [503, 503, 200]
    proxy.add(Fault("GET", "/index/00000.parquet", 503, times=2))
    assert storage.read_bytes(uri) == b"payload"
    assert _statuses(proxy, "GET", "/index/00000.parquet")[:2] == [503, 503]


def test_a_persistent_server_error_names_the_object_and_leaves_nothing_visible(faulty_s3, s3_fault):
    Fault = s3_fault
    proxy, bucket = faulty_s3
    uri = storage.join(bucket, "ds", "index", "00001.parquet")
    proxy.add(Fault("PUT", "/index/00001.parquet", 500, times=None))
    with pytest.raises(StorageError) as err:
        storage.write_bytes(uri, b"payload")
    msg = str(err.value)
    assert uri in msg and "InternalError" in msg, msg
    assert "testing" not in msg, "credentials must not appear in errors"
    assert len(_statuses(proxy, "PUT", "/index/00001.parquet")) > 1, "a 500 is worth retrying"
    assert not storage.exists(uri)
    assert storage.list_dir(storage.join(bucket, "ds"), recursive=True) == []


def test_access_denied_is_one_clear_error_for_read_write_and_list(faulty_s3, s3_fault):
    Fault = s3_fault
    proxy, bucket = faulty_s3
    uri = storage.join(bucket, "private", "a.bin")
    storage.write_bytes(uri, b"secret")
    proxy.add(Fault("GET", "/private/a.bin", 403, times=None))
    with pytest.raises(StorageError, match=r"(?i)access.?denied") as err:
        storage.read_bytes(uri)
    assert uri in str(err.value)
    proxy.add(Fault("PUT", "/private/b.bin", 403, times=None))
    with pytest.raises(StorageError, match="AccessDenied") as err:
        storage.write_bytes(storage.join(bucket, "private", "b.bin"), b"x")
    assert "private/b.bin" in str(err.value)
    assert _statuses(proxy, "PUT", "/private/b.bin") == [403], "access denied is not retried"
    proxy.add(Fault("GET", "list-type=2", 403, times=None))
    with pytest.raises(StorageError, match=r"(?i)access.?denied"):
        storage.list_dir(storage.join(bucket, "private"))


def _new_dataset(bucket: str, num_shards: int) -> str:
    from webcurate.shards import manifest

    root = storage.join(bucket, "ds")
    storage.makedirs(root)
    manifest.save(root, manifest.new("shard", {"test": True}, parent=None, num_shards=num_shards))
    return root


def _write_shard(root: str, shard: int) -> None:
    from webcurate.shards import manifest
    from webcurate.shards.writer import ShardWriter

    w = ShardWriter(root, shard)
    for i in range(3):
        w.add(f"k{shard}_{i}", b"\xff\xd8fake-jpeg-bytes", "jpg", {"source": f"src/{i}"})
    stats = w.commit()
    manifest.record_shard(root, shard, stats)


def test_a_shard_committed_under_throttling_is_complete_and_a_failed_one_is_not_published(faulty_s3, s3_fault):
    Fault = s3_fault
    proxy, bucket = faulty_s3
    root = _new_dataset(bucket, num_shards=2)
    proxy.add(Fault("PUT", "/shards/00000.tar", 503, times=2))
    proxy.add(Fault("PUT", "/index/00000.parquet", 503, times=1))
    _write_shard(root, 0)
    proxy.add(Fault("PUT", "/index/00001.parquet", 500, times=None))
    with pytest.raises(StorageError, match="00001.parquet"):
        _write_shard(root, 1)
    ds = Dataset(root)
    assert ds.completed_shards() == [0], "a shard whose index never landed must not count as complete"
    assert [r["key"] for r in ds.read_index(0).to_pylist()] == ["k0_0", "k0_1", "k0_2"]
    assert not storage.exists(storage.join(root, "index", "00001.parquet"))


def test_a_denied_index_read_is_a_storage_error_naming_the_object(faulty_s3, s3_fault):
    Fault = s3_fault
    proxy, bucket = faulty_s3
    root = _new_dataset(bucket, num_shards=1)
    _write_shard(root, 0)
    proxy.add(Fault("GET", "/index/00000.parquet", 403, times=None))
    proxy.add(Fault("HEAD", "/index/00000.parquet", 403, times=None))
    with pytest.raises(StorageError, match="00000.parquet") as err:
        Dataset(root).read_index(0)
    assert "testing" not in str(err.value), "credentials must not appear in errors"


def test_listing_a_missing_bucket_is_an_error_not_an_empty_folder(s3_server):
    with pytest.raises(StorageError, match="no-such-bucket-4711.*does not exist"):
        storage.list_dir("s3://no-such-bucket-4711/some/prefix")
