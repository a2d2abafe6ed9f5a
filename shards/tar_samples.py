"""Reading WebDataset tars sample by sample with the standard library: streamed, bounded, tolerant.

Members are grouped into samples exactly as webdataset groups them (the key
is the member name up to the first dot of its base name, the rest is the
extension, so ``img.v2.jpg`` is key ``img`` with extension ``v2.jpg``; a new
sample starts when the key changes or an extension repeats), so every reader
of our datasets agrees with webdataset and DALI on what a key is.

Unlike ``webdataset.tariterators`` this never holds a whole tar in memory,
skips (without reading) members larger than ``max_member_bytes``, and ends a
truncated tar with the samples it could read plus a note of where it broke,
instead of losing the shard. It also does not import webdataset (and with it
torch).
"""
from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass, field
from typing import IO, Iterator

_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name as webdataset splits it; None without an extension."""
    m = _NAME.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def image_ext(exts: list[str] | dict) -> str | None:
    """The sample's image extension: an exact image extension first, else one whose last part is
    (``v2.jpg``), so dotted names still find their image."""
    exact = next((e for e in IMAGE_EXTS if e in exts), None)
    if exact is not None:
        return exact
    return next((e for e in exts if e.rsplit(".", 1)[-1] in IMAGE_EXTS), None)


@dataclass
class TarSample:
    key: str
    files: dict[str, bytes] = field(default_factory=dict)
    too_large: dict[str, int] = field(default_factory=dict)  # extension -> size, not read


@dataclass
class TarBroken:
    """The tar could not be read past this point (truncated or corrupt)."""

    error: str
    partial_key: str | None  # the sample being read when it broke, if any


def iter_tar(fileobj: IO[bytes], max_member_bytes: int = 64 * 1024 * 1024) -> Iterator[TarSample | TarBroken]:
    """Samples of a tar stream in order; a ``TarBroken`` last when the stream ends early or is corrupt."""
    current: TarSample | None = None
    try:
        # A seekable file (local) is read in random-access mode, so skipped members are
        # seeked over; a stream (S3) is read through, block by block, never held.
        seekable = bool(getattr(fileobj, "seekable", lambda: False)())
        with tarfile.open(fileobj=fileobj, mode="r:*" if seekable else "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                split = split_name(member.name)
                if split is None:
                    continue
                key, ext = split
                if current is not None and (key != current.key or ext in current.files or ext in current.too_large):
                    yield current
                    current = None
                if current is None:
                    current = TarSample(key)
                if member.size > max_member_bytes:
                    current.too_large[ext] = member.size  # the stream skips it in blocks, never in memory
                    continue
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is cut short")
                current.files[ext] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        yield TarBroken(f"{type(e).__name__}: {e}"[:200], current.key if current is not None else None)
        return
    if current is not None:
        yield current
