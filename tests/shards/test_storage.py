"""Storage: one interface for local paths and s3://, atomic writes, clear errors."""
from __future__ import annotations

import os

import pytest

from webcurate.shards import storage


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "a" / "b.bin"
    storage.write_bytes(str(target), b"hello")
    assert target.read_bytes() == b"hello"
    storage.write_bytes(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["b.bin"]


def test_listing_hides_unfinished_local_writes(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"1")
    (tmp_path / "y.parquet.tmp-abc").write_bytes(b"partial")
    assert [e.name for e in storage.list_dir(str(tmp_path))] == ["x.parquet"]


def test_s3_roundtrip_listing_and_put_file(s3_bucket, tmp_path):
    uri = storage.join(s3_bucket, "ds", "index", "00000.parquet")
    storage.write_bytes(uri, b"abc")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"abc"
    local = tmp_path / "f.tar"
    local.write_bytes(os.urandom(9 * 1024 * 1024))  # above boto3's multipart threshold
    storage.put_file(str(local), storage.join(s3_bucket, "ds", "shards", "00000.tar"))
    names = [e.name for e in storage.list_dir(storage.join(s3_bucket, "ds"), recursive=True) if not e.is_dir]
    assert names == ["index/00000.parquet", "shards/00000.tar"]
    assert storage.read_bytes(storage.join(s3_bucket, "ds", "shards", "00000.tar")) == local.read_bytes()


def test_s3_missing_object_is_file_not_found(s3_bucket):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(s3_bucket, "nope.json"))


def test_s3_missing_bucket_names_the_bucket_and_hides_credentials(s3_server):
    with pytest.raises(storage.StorageError) as info:
        storage.write_bytes("s3://no-such-bucket-xyz/k.json", b"{}")
    msg = str(info.value)
    assert "no-such-bucket-xyz" in msg and "NoSuchBucket" in msg
    assert "testing" not in msg  # the secret key's value never appears
