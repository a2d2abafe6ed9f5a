"""One storage interface for local paths and ``s3://bucket/prefix`` URIs.

Listings and streamed reads go through ``pyarrow.fs``; whole-object reads of S3
(bytes, parquet parts) go through boto3, whose retries survive throttling.
Whole-object writes are atomic for readers:

- local: write ``<name>.tmp-<uuid>`` beside the target, fsync, ``os.replace``;
- S3: the object is uploaded by boto3's managed transfer, which completes the
  multipart upload last and aborts it on failure, so a reader never sees a
  partial object (pyarrow's output stream completes the upload even when the
  writer failed half-way, which is why it is not used for writes).

Endpoint, region and credentials come from the standard AWS chain;
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) points every client at a
non-AWS endpoint such as a local test server.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import posixpath
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from typing import Iterator

import pyarrow.fs as pafs

from .errors import StorageError


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or S3 URI with ``/``."""
    if is_s3(uri):
        out = uri.rstrip("/")
        for p in parts:
            out = out + "/" + p.strip("/")
        return out
    return os.path.join(uri, *parts)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"not an S3 URI with a bucket: {uri!r}")
    return bucket, key


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=8)
def _s3fs(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host or scheme
        kwargs["scheme"] = scheme if host else "https"
        # Local S3 servers do not speak virtual-host addressing.
        kwargs["force_virtual_addressing"] = False
    kwargs["region"] = region or "us-east-1"
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=5)
    # Writes through this filesystem (Ray Train's checkpoints) then send small objects as one
    # PutObject: otherwise pyarrow writes even empty marker files as multipart uploads with no
    # parts, which S3-compatible servers (moto, some MinIO versions) reject.
    kwargs["allow_delayed_open"] = True
    return pafs.S3FileSystem(**kwargs)


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _s3fs(endpoint_url(), _region()), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


@functools.lru_cache(maxsize=4)
def _boto_client(endpoint: str | None, region: str | None):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region or "us-east-1",
        config=Config(retries={"max_attempts": 5, "mode": "standard"}),
    )


def s3_client():
    """A boto3 S3 client configured like the pyarrow one (cached per process)."""
    return _boto_client(endpoint_url(), _region())


def _describe(exc: BaseException, uri: str, action: str) -> StorageError:
    # botocore errors carry a code; keep the message short and free of credentials.
    code = getattr(exc, "response", {}).get("Error", {}).get("Code") if hasattr(exc, "response") else None
    msg = f"{action} {uri} failed: {code or type(exc).__name__}: {exc}"
    return StorageError(msg)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise _describe(e, uri, "stat") from e


def _error_code(exc: BaseException) -> str:
    """botocore's error code of ``exc`` ("NoSuchKey", "AccessDenied", "404", ...), else ""."""
    return str(getattr(exc, "response", None) and exc.response.get("Error", {}).get("Code", "") or "")


def _s3_get(uri: str) -> bytes:
    # boto3, not pyarrow: pyarrow's GetObject fails on a throttling (503 SlowDown) answer
    # with "Failed to flush response stream" instead of retrying it.
    bucket, key = split_s3(uri)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as e:  # noqa: BLE001 - botocore raises many types; report them uniformly
        if _error_code(e) in ("NoSuchKey", "404", "NotFound"):
            raise FileNotFoundError(uri) from e
        raise _describe(e, uri, "read") from e


@contextlib.contextmanager
def _local_read_errors(uri: str) -> Iterator[None]:
    """Map pyarrow's local read failures: missing -> FileNotFoundError, else StorageError."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as e:
        if "Path does not exist" in str(e):
            raise FileNotFoundError(uri) from e
        raise _describe(e, uri, "read") from e


def read_bytes(uri: str) -> bytes:
    """The whole object at ``uri``; a missing one is ``FileNotFoundError``."""
    if is_s3(uri):
        return _s3_get(uri)
    fs, path = filesystem(uri)
    with _local_read_errors(uri), fs.open_input_stream(path, compression=None) as f:  # no .gz decoding
        return f.read()


def open_input_file(uri: str):
    """A seekable random-access file (pyarrow NativeFile) for ``uri``."""
    fs, path = filesystem(uri)
    try:
        return fs.open_input_file(path)
    except OSError as e:
        raise _describe(e, uri, "open") from e


def read_parquet(uri: str, columns: list[str] | None = None):
    """A parquet file as a pyarrow Table; a missing file is ``FileNotFoundError``, any other
    failure (denied, throttled past retries, unreachable) a ``StorageError`` naming ``uri``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if is_s3(uri):  # one retried GET (see _s3_get); index and sidecar parts fit in memory
        return pq.read_table(pa.BufferReader(_s3_get(uri)), columns=columns)
    fs, path = filesystem(uri)
    with _local_read_errors(uri):
        return pq.read_table(path, filesystem=fs, columns=columns)


def write_bytes(uri: str, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``uri`` atomically (readers see all of it or nothing).

    ``durable=False`` skips the local fsync: for scratch files a crash makes the stage redo anyway.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().upload_fileobj(io.BytesIO(data), bucket, key)
        except Exception as e:  # botocore raises many types; report them uniformly
            raise _describe(e, uri, "upload") from e
        return
    path = os.path.abspath(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def put_file(local_path: str, uri: str) -> None:
    """Move/upload a finished local file to ``uri`` atomically."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().upload_file(local_path, bucket, key)
        except Exception as e:
            raise _describe(e, uri, "upload") from e
        return
    path = os.path.abspath(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    shutil.copyfile(local_path, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def makedirs(uri: str) -> None:
    if not is_s3(uri):
        os.makedirs(uri, exist_ok=True)


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        if "does not exist" not in str(e):
            raise _describe(e, uri, "delete") from e


def delete_tree(uri: str) -> None:
    """Delete a folder (an S3 prefix) and everything under it; a missing one is fine."""
    fs, path = filesystem(uri)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        if "does not exist" not in str(e) and "not found" not in str(e).lower():
            raise _describe(e, uri, "delete") from e


@dataclass(frozen=True)
class Entry:
    uri: str
    name: str
    size: int
    is_dir: bool


def list_dir(uri: str, recursive: bool = False) -> list[Entry]:
    """Entries under ``uri`` (empty when it does not exist), sorted by URI."""
    fs, path = filesystem(uri)
    sel = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    try:
        infos = fs.get_file_info(sel)
    except OSError as e:
        raise _describe(e, uri, "list") from e
    if not infos and is_s3(uri):
        _require_bucket(uri)  # a missing bucket is an error, not an empty folder
    prefix = uri.rstrip("/")
    out = []
    for info in infos:
        rel = info.path[len(path):].lstrip("/")
        if ".tmp-" in info.base_name:
            continue  # an unfinished local write
        full = join(prefix, rel) if is_s3(uri) else os.path.join(path, rel)
        out.append(Entry(full, rel, info.size or 0, info.type == pafs.FileType.Directory))
    return sorted(out, key=lambda e: e.uri)


def _require_bucket(uri: str) -> None:
    bucket, _ = split_s3(uri)
    try:
        s3_client().head_bucket(Bucket=bucket)
    except Exception as e:  # noqa: BLE001 - botocore's ClientError and connection errors
        if _error_code(e) in ("404", "NoSuchBucket"):
            raise StorageError(f"list {uri} failed: bucket {bucket!r} does not exist") from e
        raise _describe(e, uri, "list") from e


def absolute(uri: str) -> str:
    """``uri`` unchanged for S3, else an absolute path: Ray workers do not share the driver's working folder."""
    return uri if is_s3(uri) else os.path.abspath(uri)


def local_tempdir(prefix: str = "webcurate-") -> str:
    return tempfile.mkdtemp(prefix=prefix)


def copy_to_local(uri: str, local_path: str) -> str:
    """Copy an object to a local file (used for tools that need real paths)."""
    if not is_s3(uri):
        return os.path.abspath(uri)
    fs, path = filesystem(uri)
    with fs.open_input_stream(path, compression=None) as src, open(local_path, "wb") as dst:
        while True:
            chunk = src.read(1 << 22)
            if not chunk:
                break
            dst.write(chunk)
    return local_path


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/")) if is_s3(uri) else os.path.basename(uri.rstrip("/"))
