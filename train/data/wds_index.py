"""DALI WebDataset index files (``v1.2``) for our shards, cached on local disk.

DALI's ``fn.readers.webdataset`` needs one index per tar listing, per sample,
``<ext> <data offset> <size> <name>`` of each component it may return. We write
those ourselves instead of letting DALI infer them (which it redoes at every
pipeline build) because the index is also where the loader decides what to train
on:

- only the image component of each sample is listed (DALI then reads no json/txt);
- when the dataset's parquet index sits beside the shards
  (``<root>/index/NNNNN.parquet``) only rows with ``status == "ok"`` are kept, so
  duplicates and opted-out samples marked after the tar was written never reach
  training;
- images whose bytes are obviously broken (no JPEG/PNG/WebP signature, a JPEG
  without its end marker: truncated downloads) are dropped and counted;
- an image the decoder still rejects at run time is *replaced* by its neighbour in
  the same tar (``substitute``), keeping the sample count and therefore the
  shuffle order and every later batch unchanged.

Index files live under a cache folder keyed by the shard URI, size and mtime (so
a rewritten shard gets a fresh index). Each shard's index is also cut into chunk
index files of consecutive samples, which the loader visits in a random order
across all shards (the same tar appears once per chunk in the reader's list). Building one reads the tar once: headers
only for local files, one streamed GET for ``s3://`` (where DALI then reads the
tar itself through its S3 client). If ``NNNNN.idx`` lies beside the tar it is
used instead of reading the tar.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from webcurate.shards import layout, storage
from webcurate.shards.dataset import DatasetError

from .dali_pipeline import DECODABLE_EXTS

INDEX_VERSION = "v1.2"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "webcurate", "dali-index")


class ShardIndexError(DatasetError):
    """A shard cannot be indexed (missing, not a tar, no images)."""


@dataclass
class ShardIndex:
    """The local DALI index of one shard and what went into it."""

    uri: str
    idx_path: str  # the whole shard (the record; substitutions applied)
    num_samples: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    chunks: list[tuple[str, int]] = field(default_factory=list)  # (index file, samples) in shard order


@dataclass
class _Entry:
    key: str
    ext: str
    offset: int
    size: int
    name: str

    def line(self) -> str:
        return f"{self.ext} {self.offset} {self.size} {self.name}"


def cache_dir(configured: str | None = None) -> str:
    """The folder index files are cached in (``WEBCURATE_CACHE`` overrides the default)."""
    if configured:
        return configured
    env = os.environ.get("WEBCURATE_CACHE")
    return os.path.join(env, "dali-index") if env else DEFAULT_CACHE


def _split_name(name: str) -> tuple[str, str]:
    # WebDataset: the key is everything before the first dot of the basename.
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def _looks_decodable(ext: str, head: bytes, tail: bytes) -> str | None:
    """None when the signature fits ``ext``'s family, else the reason to drop it."""
    if head.startswith(b"\xff\xd8"):
        # A JPEG that lost its end-of-image marker was cut off mid-download.
        return None if b"\xff\xd9" in tail else "truncated_jpeg"
    if head.startswith(b"\x89PNG"):
        return None if b"IEND" in tail else "truncated_png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return None
    if head.startswith(b"BM") or head[:4] in (b"II*\x00", b"MM\x00*"):
        return None
    return f"not_an_image({ext})"


def _ok_keys(tar_uri: str) -> set[str] | None:
    """Keys with status ok from the dataset index beside ``tar_uri``; None if there is none.

    Applies to our layout only: ``<root>/shards/NNNNN.tar`` -> ``<root>/index/NNNNN.parquet``.
    """
    if storage.is_s3(tar_uri):
        parts = tar_uri.rstrip("/").rsplit("/", 2)
        if len(parts) != 3:
            return None
        root, folder, name = parts
    else:
        folder_path, name = os.path.split(os.path.abspath(tar_uri))
        root, folder = os.path.split(folder_path)
    if folder != layout.SHARDS_DIR or not name.endswith(".tar"):
        return None
    uri = storage.join(root, layout.INDEX_DIR, f"{name[:-4]}.parquet")
    if not storage.exists(uri):
        return None
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    table = pq.read_table(path, filesystem=fs, columns=["key", "status"])
    return {k for k, s in zip(table["key"].to_pylist(), table["status"].to_pylist()) if s == "ok"}


def _scan_tar(uri: str) -> tuple[list[_Entry], dict[str, int]]:
    """Image entries of a tar (first image per key) and drop counts, with signature checks."""
    entries: list[_Entry] = []
    dropped: dict[str, int] = {}
    seen: set[str] = set()

    def consider(member: tarfile.TarInfo, read) -> None:
        if not member.isfile():
            return
        key, ext = _split_name(member.name)
        base = key.rsplit("/", 1)[-1]
        if not base or base.startswith(".") or ext.lower() not in DECODABLE_EXTS or key in seen:
            return
        seen.add(key)
        reason = _looks_decodable(ext, *read(member))
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            return
        entries.append(_Entry(key, ext, member.offset_data, member.size, member.name))

    try:
        if storage.is_s3(uri):
            fs, path = storage.filesystem(uri)
            with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
                for m in tf:
                    def read_stream(member, _tf=tf):
                        data = _tf.extractfile(member).read() if member.size else b""
                        return data[:16], data[-64:]
                    consider(m, read_stream)
        else:
            with open(uri, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
                def read_local(member):
                    f.seek(member.offset_data)
                    head = f.read(min(16, member.size))
                    f.seek(member.offset_data + max(0, member.size - 64))
                    return head, f.read(min(64, member.size))
                for m in tf:
                    pos = f.tell()
                    consider(m, read_local)
                    f.seek(pos)  # tarfile expects the file where it left it
    except FileNotFoundError as e:
        raise ShardIndexError(f"shard {uri} does not exist") from e
    except tarfile.TarError as e:
        raise ShardIndexError(f"shard {uri} is not a readable tar: {e}") from e
    except storage.StorageError as e:
        raise ShardIndexError(f"shard {uri}: {e}") from e
    return entries, dropped


def _parse_idx(text: str) -> list[_Entry]:
    lines = text.splitlines()
    if not lines or not lines[0].startswith("v1.2"):
        raise ShardIndexError("index file is not DALI v1.2")
    out = []
    for line in lines[1:]:
        parts = line.split()
        if len(parts) < 4:
            continue
        # a line may list several components: take the first decodable one
        for i in range(0, len(parts) - 3, 4):
            ext, off, size, name = parts[i:i + 4]
            if ext.lower() in DECODABLE_EXTS:
                out.append(_Entry(_split_name(name)[0], ext, int(off), int(size), name))
                break
    return out


def _write_text(path: str, text: str) -> None:
    """Write a local file atomically (temp name, then rename): concurrent workers may race."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-idx-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _idx_text(entries: list[_Entry]) -> str:
    return f"{INDEX_VERSION} {len(entries)}\n" + "".join(e.line() + "\n" for e in entries)


def _write_idx(path: str, entries: list[_Entry], meta: dict) -> None:
    # meta first, then the index: an index file present means its meta is too.
    _write_text(path + ".json", json.dumps(meta))
    _write_text(path, _idx_text(entries))


def _read_meta(path: str) -> dict:
    try:
        with open(path + ".json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _cache_path(uri: str, cache: str) -> str:
    fs, path = storage.filesystem(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise ShardIndexError(f"shard {uri}: {e}") from e
    if info.type == pafs.FileType.NotFound:
        raise ShardIndexError(f"shard {uri} does not exist")
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    digest = hashlib.sha1(f"{uri}\0{info.size}\0{mtime}".encode()).hexdigest()[:20]
    stem = uri.rstrip("/").rsplit("/", 1)[-1].replace(".tar", "")
    return os.path.join(cache, f"{stem}-{digest}.idx")


def _chunks(idx_path: str, num_samples: int, revision: int, chunk_size: int) -> list[tuple[str, int]]:
    """Index files of consecutive ``chunk_size`` runs of the shard's samples (made once, cached).

    The reader then visits chunks of all shards in a random order, so one batch mixes
    many shards even when every shard holds one class (as an ImageFolder ingest makes).
    """
    if chunk_size <= 0 or num_samples <= chunk_size:
        return [(idx_path, num_samples)]
    folder = f"{idx_path}.r{revision}.c{chunk_size}"
    sizes = [min(chunk_size, num_samples - j) for j in range(0, num_samples, chunk_size)]
    paths = [os.path.join(folder, f"{j:05d}.idx") for j in range(len(sizes))]
    marker = os.path.join(folder, "_complete")
    if not os.path.exists(marker):
        with open(idx_path) as f:
            entries = _parse_idx(f.read())
        for j, path in enumerate(paths):
            _write_text(path, _idx_text(entries[j * chunk_size:(j + 1) * chunk_size]))
        _write_text(marker, "")
    return list(zip(paths, sizes))


def shard_index(uri: str, cache: str | None = None, chunk_size: int = 0) -> ShardIndex:
    """The cached DALI index of one shard (and its chunks), building it on first use."""
    path = _cache_path(uri, cache_dir(cache))
    if not os.path.exists(path):
        sibling = uri[:-4] + ".idx" if uri.endswith(".tar") else None
        if sibling and storage.exists(sibling):
            entries, dropped = _parse_idx(storage.read_bytes(sibling).decode()), {}
        else:
            entries, dropped = _scan_tar(uri)
        ok = _ok_keys(uri)
        if ok is not None:
            before = len(entries)
            entries = [e for e in entries if e.key.rsplit("/", 1)[-1] in ok or e.key in ok]
            if before - len(entries):
                dropped["status_not_ok"] = before - len(entries)
        _write_idx(path, entries, {"uri": uri, "dropped": dropped, "num_samples": len(entries), "revision": 0})
    with open(path) as f:
        n = int(f.readline().split()[1])
    meta = _read_meta(path)
    return ShardIndex(uri, path, n, dict(meta.get("dropped", {})),
                      _chunks(path, n, int(meta.get("revision", 0)), chunk_size))


def substitute(index: ShardIndex, bad_offset: int, chunk_size: int = 0) -> ShardIndex | None:
    """Point every sample whose image starts at ``bad_offset`` to the next other image.

    Keeps the sample count (so the reader's shuffle and every other batch stay the
    same) and records the replacement in the index's ``.json``. Returns the updated
    index (with fresh chunk files), or None when no entry starts there or no other
    image exists.
    """
    with open(index.idx_path) as f:
        entries = _parse_idx(f.read())
    hits = [i for i, e in enumerate(entries) if e.offset == bad_offset]
    if not hits:
        return None
    bad = entries[hits[0]]
    good = None
    for step in range(1, len(entries)):
        cand = entries[(hits[0] + step) % len(entries)]
        if cand.offset != bad_offset:
            good = cand
            break
    if good is None:
        return None
    for i in hits:
        entries[i] = _Entry(entries[i].key, good.ext, good.offset, good.size, good.name)
    meta = _read_meta(index.idx_path) or {"uri": index.uri}
    meta.setdefault("substituted", {})[bad.name] = good.name
    dropped = dict(meta.get("dropped", {}))
    dropped["decode_failed"] = dropped.get("decode_failed", 0) + 1
    meta["dropped"] = dropped
    meta["revision"] = int(meta.get("revision", 0)) + 1  # new chunk files for the new content
    _write_idx(index.idx_path, entries, meta)
    return ShardIndex(index.uri, index.idx_path, index.num_samples, dropped,
                      _chunks(index.idx_path, index.num_samples, meta["revision"], chunk_size))
