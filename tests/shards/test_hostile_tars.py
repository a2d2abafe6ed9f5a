"""Adopting foreign tars that are broken in every way we know (issue 17.5, 17.10): one bad sample is one
failure row, never the shard; a 1 GiB member is skipped unread; keys with dots and repeated keys are handled."""
from __future__ import annotations

import io
import json
import resource
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from webcurate.shards.adopt import adopt
from webcurate.shards.dataset import Dataset
from webcurate.shards.tar_samples import TarBroken, iter_tar, split_name

GIB = 1024 ** 3


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _sparse_member(f, name: str, size: int) -> None:
    """A tar member of ``size`` zero bytes written as a hole: the tar stays small on disk."""
    info = tarfile.TarInfo(name)
    info.size = size
    f.write(info.tobuf(format=tarfile.USTAR_FORMAT))
    f.seek(-(-size // 512) * 512, io.SEEK_CUR)


@pytest.fixture
def foreign(tmp_path, imagegen):
    """Three foreign shards: malformed metadata, dotted keys, a sparse 1 GiB member, repeated keys, truncation."""
    root = tmp_path / "foreign"
    root.mkdir()
    jpg = imagegen.photo_jpeg
    with open(root / "00000.tar", "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, meta, n in (("a", b'{"url": "https://x/a.jpg", "caption": "fine"}', 1),
                                 ("b", b"{not json", 2), ("c", b"[1, 2]", 3),
                                 ("d", b'{"caption": ["a", "list"]}', 4), ("e", None, 5)):
                _member(tar, f"{key}.jpg", jpg(n, 64, 48))
                if meta is not None:
                    _member(tar, f"{key}.json", meta)
            _member(tar, "e.txt", b"caf\xe9 latin-1")
            _member(tar, "img.v2.jpg", jpg(6, 64, 48))  # key "img", extension "v2.jpg"
            _member(tar, "img.json", b'{"caption": "dotted"}')
            f.flush()
            _sparse_member(f, "huge.jpg", GIB)
            tar.offset = f.tell()  # continue writing after the hole
            _member(tar, "z.jpg", jpg(7, 64, 48))
            _member(tar, "a.jpg", jpg(8, 64, 48))  # the key "a" again, later in the same tar
    with tarfile.open(root / "00001.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        _member(tar, "a.jpg", jpg(9, 64, 48))  # already in shard 0
        _member(tar, "f.jpg", jpg(10, 64, 48))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, n in (("g", 11), ("h", 12), ("i", 13)):
            _member(tar, f"{key}.jpg", jpg(n, 64, 48))
            _member(tar, f"{key}.json", json.dumps({"caption": key}).encode())
    whole = buf.getvalue()
    cut = whole.index(b"i.jpg") + 512 + 200  # inside i.jpg's data
    (root / "00002.tar").write_bytes(whole[:cut])
    pq.write_table(pa.Table.from_pylist([{"key": k, "url": f"https://x/{k}", "caption": k, "status": "success",
                                          "error_message": None} for k in ("g", "h", "i", "j")]),
                   root / "00002.parquet")
    return root


def test_split_names_like_webdataset():
    assert split_name("img.v2.jpg") == ("img", "v2.jpg")
    assert split_name("dir/x.y/k.JPG") == ("dir/x.y/k", "jpg")
    assert split_name("README") is None


def test_every_hostile_sample_is_its_own_row_and_good_ones_survive(foreign, ray_local):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows0 = _adopt_one(foreign)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before < GIB // 2  # huge.jpg never read
    adopt(str(foreign), workers=2, summary=False)
    rows = [(r["shard"], r["key"], r["status"], (r["error"] or "").split(":")[0], r["ext"])
            for r in Dataset(str(foreign)).index().to_pylist()]
    assert rows == [
        (0, "a", "ok", "", "jpg"),
        (0, "b", "failed", "bad_json", "jpg"),
        (0, "c", "failed", "bad_json", "jpg"),
        (0, "d", "failed", "bad_json", "jpg"),
        (0, "e", "failed", "bad_caption", "jpg"),
        (0, "img", "ok", "", "v2.jpg"),
        (0, "huge", "failed", "body_too_large", "jpg"),
        (0, "z", "ok", "", "jpg"),  # read after the skipped 1 GiB member
        (0, "a", "failed", "duplicate_key", "jpg"),  # twice in one tar
        (1, "a", "failed", "duplicate_key", "jpg"),  # already in shard 0
        (1, "f", "ok", "", "jpg"),
        (2, "g", "ok", "", "jpg"),
        (2, "h", "ok", "", "jpg"),
        (2, "i", "failed", "truncated_tar", None),
        (2, "j", "failed", "truncated_tar", None),  # upstream success the cut tar never delivered
    ]
    assert rows0 == rows[:9]
    ds = Dataset(str(foreign))
    dotted = next(ds.iter_samples(0, keys=["img"]))
    assert dotted.ext == "v2.jpg" and dotted.caption == "dotted"
    # The skipped member and the repeat do not stop a reader of the ok rows either.
    assert [s.key for s in ds.iter_samples(1)] == ["a", "f"]
    assert ds.manifest["counts"]["ok"] == 6


def _adopt_one(root) -> list[tuple]:
    """Shard 0 indexed in this process (memory measured here, not in a Ray worker)."""
    from webcurate.shards.adopt import adopt_shard
    from webcurate.shards import storage

    adopt_shard(0, root=str(root), tar_name="00000.tar")
    rows = storage.read_parquet(str(root / "index" / "00000.parquet")).to_pylist()
    (root / "index" / "00000.parquet").unlink()
    return [(r["shard"], r["key"], r["status"], (r["error"] or "").split(":")[0], r["ext"]) for r in rows]


def test_a_truncated_stream_keeps_what_came_before(foreign):
    with open(foreign / "00002.tar", "rb") as f:
        data = f.read()

    class Stream(io.RawIOBase):  # not seekable, like an S3 body
        def __init__(self):
            self.inner = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            chunk = self.inner.read(len(b))
            b[:len(chunk)] = chunk
            return len(chunk)

    items = list(iter_tar(Stream()))
    assert [getattr(i, "key", None) for i in items[:-1]] == ["g", "h"]
    assert isinstance(items[-1], TarBroken) and items[-1].partial_key == "i"
