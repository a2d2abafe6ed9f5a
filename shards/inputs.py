"""Reading what to ingest: a folder tree of images, or a URL list file.

Both become one pyarrow table, one row per input, in a deterministic order,
with columns ``source`` (URL or relative path), ``key``, optional
``caption``/``label`` and any other input columns kept as metadata.
"""
from __future__ import annotations

import gzip
import io
import os
import posixpath

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from . import storage
from .errors import InputError
from .keys import unique_keys
from .schema import CORE_COLUMNS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
LIST_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".json", ".txt")


def is_url_list(uri: str) -> bool:
    name = uri.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return name.endswith(LIST_SUFFIXES)


def read_folder(root: str, labels_from_dirs: bool = False) -> tuple[pa.Table, int]:
    """Images under ``root`` (any depth, sorted by relative path).

    Returns the table and the number of non-image files ignored. With
    ``labels_from_dirs`` the first directory level is the class name
    (ImageFolder layout). A ``name.txt`` beside ``name.jpg`` is its caption.
    """
    entries = [e for e in storage.list_dir(root, recursive=True) if not e.is_dir]
    if not entries:
        raise InputError(f"{root} holds no files (or does not exist)")
    by_name = {e.name: e for e in entries}
    images = sorted(e.name for e in entries if e.name.lower().endswith(IMAGE_SUFFIXES))
    ignored = sum(1 for e in entries if not e.name.lower().endswith(IMAGE_SUFFIXES + (".txt",)))
    if not images:
        raise InputError(f"{root} holds no images with suffixes {', '.join(IMAGE_SUFFIXES)}")
    sources, captions, labels = [], [], []
    for rel in images:
        rel_posix = rel.replace(os.sep, "/")
        sources.append(rel_posix)
        stem = posixpath.splitext(rel_posix)[0]
        cap = by_name.get(stem + ".txt")
        captions.append(storage.read_bytes(cap.uri).decode("utf-8", "replace").strip() if cap else None)
        if labels_from_dirs:
            parts = rel_posix.split("/")
            if len(parts) < 2:
                raise InputError(f"--labels-from-dirs: {rel_posix} is not inside a class folder")
            labels.append(parts[0])
    cols: dict[str, list] = {"source": sources, "key": unique_keys(sources), "caption": captions}
    if labels_from_dirs:
        cols["label"] = labels
    return pa.table(cols), ignored


def _read_list_bytes(uri: str) -> tuple[bytes, str]:
    data = storage.read_bytes(uri)
    name = uri.lower()
    if name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except OSError as e:
            raise InputError(f"{uri}: not valid gzip ({e})") from e
        name = name[:-3]
    return data, name


def read_url_list(
    uri: str,
    url_col: str = "url",
    caption_col: str | None = "caption",
    label_col: str | None = None,
) -> pa.Table:
    """A URL list (parquet, CSV, TSV, JSONL, or plain text one URL per line; optionally .gz).

    Columns other than url/caption/label are kept; names that clash with index
    columns get a ``src_`` prefix so they never overwrite measured values.
    """
    data, name = _read_list_bytes(uri)
    try:
        if name.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
        elif name.endswith(".csv"):
            table = pacsv.read_csv(io.BytesIO(data))
        elif name.endswith(".tsv"):
            table = pacsv.read_csv(io.BytesIO(data), parse_options=pacsv.ParseOptions(delimiter="\t"))
        elif name.endswith((".jsonl", ".json")):
            table = pajson.read_json(io.BytesIO(data))
        else:  # .txt: one URL per line
            lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
            table = pa.table({url_col: lines})
    except pa.ArrowInvalid as e:
        raise InputError(f"{uri}: cannot parse as {posixpath.splitext(name)[1]}: {e}") from e
    if url_col not in table.column_names:
        raise InputError(f"{uri} has no column {url_col!r} (columns: {', '.join(table.column_names)}); use --url-col")
    if label_col and label_col not in table.column_names:
        raise InputError(f"{uri} has no label column {label_col!r}")
    rename = {url_col: "source"}
    if caption_col and caption_col in table.column_names:
        rename[caption_col] = "caption"
    if label_col:
        rename[label_col] = "label"
    names = []
    for c in table.column_names:
        if c in rename:
            names.append(rename[c])
        elif c in CORE_COLUMNS or c == "source":
            names.append(f"src_{c}")
        else:
            names.append(c)
    table = table.rename_columns(names)
    sources = [s if s is not None else "" for s in table["source"].cast(pa.string()).to_pylist()]
    table = table.set_column(table.column_names.index("source"), "source", pa.array(sources, pa.string()))
    if "caption" in table.column_names:
        table = table.set_column(table.column_names.index("caption"), "caption", table["caption"].cast(pa.string()))
    if "label" in table.column_names:
        table = table.set_column(table.column_names.index("label"), "label", table["label"].cast(pa.string()))
    return table.append_column("key", pa.array(unique_keys(sources), pa.string()))


def extra_columns(table: pa.Table) -> pa.Schema:
    """Schema of the input columns that are not index columns (kept as metadata)."""
    return pa.schema([f for f in table.schema if f.name not in CORE_COLUMNS])
