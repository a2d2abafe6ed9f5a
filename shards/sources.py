"""What a sample's source may be and how its bytes are read, with the same caps for every kind.

- URL lists: ``http(s)://`` only by default. ``file://`` URLs and absolute
  paths need ``allow_local_files``; ``s3://`` objects need ``allow_s3_sources``
  (any bucket) or a bucket in ``s3_source_buckets`` — a URL list is input from
  elsewhere, and reading the worker's disk or the user's buckets on its behalf
  would hand them to whoever wrote it.
- Folder inputs: paths relative to the folder the user named.

Local reads are capped like downloads (``max_bytes``) and refuse anything but
a regular file (a FIFO would block, a device would never end); S3 reads check
the object's size before reading its body.

HTTP attempts go through ``download.Downloader``; a retryable failure raises
``RetryLater`` carrying the wait that ``urllib3.util.Retry`` computed (its
backoff, or the server's ``Retry-After``), so the per-host scheduler, not a
sleeping thread, does the waiting.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from urllib3.exceptions import ConnectTimeoutError, MaxRetryError
from urllib3.util import Retry

from . import storage
from .download import RETRY_STATUS, Downloader, FetchFailed, FetchOptions

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def normalize_source(source: str | None) -> str:
    """Surrounding whitespace removed and the scheme lower-cased (``HTTP://x`` -> ``http://x``)."""
    s = (source or "").strip()
    m = _SCHEME.match(s)
    return m.group(1).lower() + s[m.end(1):] if m else s


def host_of(source: str) -> str:
    """The host an HTTP source talks to ('' for anything else): the unit of politeness."""
    if not source.startswith(("http://", "https://")):
        return ""
    rest = source.split("://", 1)[1]
    return rest.split("/", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1].lower()


class RetryLater(Exception):
    """Try this source again after ``delay`` seconds; ``host_wide``: the host asked everyone to wait."""

    def __init__(self, delay: float, host_wide: bool, failure: FetchFailed):
        super().__init__(f"retry in {delay:.2f}s after {failure}")
        self.delay = delay
        self.host_wide = host_wide
        self.failure = failure


@dataclass
class Attempts:
    """The retry state of one HTTP source across its attempts (a ``urllib3.util.Retry``)."""

    retry: Retry

    @classmethod
    def for_options(cls, opts: FetchOptions) -> "Attempts":
        n = max(0, int(opts.retries))
        return cls(Retry(total=n, connect=n, read=n, status=n, other=0, redirect=False,
                         status_forcelist=RETRY_STATUS, backoff_factor=opts.backoff, backoff_jitter=opts.backoff,
                         respect_retry_after_header=True, retry_after_max=10**9, raise_on_status=True))


def read_http(url: str, downloader: Downloader, attempts: Attempts) -> bytes:
    """One attempt at ``url``; ``RetryLater`` when Retry says another is due, ``FetchFailed`` when final."""
    try:
        return downloader.get(url)
    except FetchFailed as f:
        _raise_retry(url, f, downloader.opts, attempts)
        raise


def _raise_retry(url: str, f: FetchFailed, opts: FetchOptions, attempts: Attempts) -> None:
    if f.response is not None and f.status is not None:
        if not attempts.retry.is_retry("GET", f.status, has_retry_after="Retry-After" in f.response.headers):
            return
        try:
            attempts.retry = attempts.retry.increment("GET", url, response=f.response)
        except MaxRetryError:
            return
        try:
            after = attempts.retry.get_retry_after(f.response)
        except Exception:  # noqa: BLE001 - a malformed Retry-After: fall back to the backoff
            after = None
        if after is not None:
            if after > opts.max_retry_after:
                f.detail = f"{f.detail}; Retry-After {after:.0f}s exceeds --max-retry-after {opts.max_retry_after:g}"
                f.args = (f"{f.reason}: {f.detail}",)
                return
            raise RetryLater(after, host_wide=True, failure=f)
        raise RetryLater(attempts.retry.get_backoff_time(), host_wide=False, failure=f)
    if f.error is None or (f.reason == "timeout" and not isinstance(f.error, ConnectTimeoutError)):
        return  # a read that hung once will hang again: retrying only multiplies the wait
    try:
        attempts.retry = attempts.retry.increment("GET", url, error=f.error)
    except Exception:  # noqa: BLE001 - MaxRetryError, or the error re-raised when that kind is off
        return
    raise RetryLater(attempts.retry.get_backoff_time(), host_wide=False, failure=f)


def check_url_source(source: str, opts: FetchOptions) -> tuple[str, str]:
    """``(kind, target)`` for a URL-list source: kind ``http``, ``local`` or ``s3``; refuses the rest."""
    if source.startswith(("http://", "https://")):
        return "http", source
    if source.startswith("s3://"):
        bucket = source[len("s3://"):].split("/", 1)[0]
        if not (opts.allow_s3_sources or bucket in opts.s3_source_buckets):
            raise FetchFailed("blocked_source", f"s3:// sources are off (bucket {bucket!r}); "
                                                "allow them with --allow-s3-sources or --s3-source-bucket")
        return "s3", source
    if source.startswith("file://") or os.path.isabs(source):
        if not opts.allow_local_files:
            raise FetchFailed("blocked_source", "local files in a URL list are off; allow them with --allow-local-files")
        return "local", source[len("file://"):] if source.startswith("file://") else source
    if not source:
        raise FetchFailed("invalid_url", "empty url")
    raise FetchFailed("invalid_url", f"unsupported source {source[:100]!r}")


def read_local(path: str, max_bytes: int) -> bytes:
    """A regular local file of at most ``max_bytes``; never blocks on a FIFO or reads a device."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise FetchFailed("not_found", path[:200])
    except OSError as e:
        raise FetchFailed("read_error", f"{path[:150]}: {e.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FetchFailed("not_regular_file", f"{path[:150]} is not a regular file")
        if st.st_size > max_bytes:
            raise FetchFailed("body_too_large", f"{st.st_size} bytes > {max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)  # a file that grew since fstat is still capped
        if len(data) > max_bytes:
            raise FetchFailed("body_too_large", f"more than {max_bytes} bytes")
        return data
    except OSError as e:
        raise FetchFailed("read_error", f"{path[:150]}: {e}"[:200])
    finally:
        os.close(fd)


def read_s3(uri: str, max_bytes: int) -> bytes:
    """An S3 object of at most ``max_bytes`` (its size is checked before the body is read)."""
    bucket, key = storage.split_s3(uri)
    try:
        obj = storage.s3_client().get_object(Bucket=bucket, Key=key)
    except Exception as e:  # noqa: BLE001 - botocore raises many types
        if storage._error_code(e) in ("NoSuchKey", "404", "NotFound"):
            raise FetchFailed("not_found", uri[:200])
        raise FetchFailed("read_error", f"{storage._error_code(e) or type(e).__name__}: {uri[:150]}")
    body = obj["Body"]
    try:
        if int(obj.get("ContentLength") or 0) > max_bytes:
            raise FetchFailed("body_too_large", f"{obj['ContentLength']} bytes > {max_bytes}")
        data = body.read(max_bytes + 1)
    finally:
        body.close()
    if len(data) > max_bytes:
        raise FetchFailed("body_too_large", f"more than {max_bytes} bytes")
    return data


def read_folder_file(base: str, rel: str, max_bytes: int) -> bytes:
    """A file of a folder input (local or S3), capped like any other source."""
    uri = storage.join(base, rel)
    return read_s3(uri, max_bytes) if storage.is_s3(uri) else read_local(uri, max_bytes)
