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
import zlib

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from . import storage
from .errors import InputError
from .keys import unique_keys
from .schema import CORE_COLUMNS
from .sources import normalize_source

# Internal column: why an input row cannot be used (never written to the index as such).
INPUT_ERROR = "_input_error"

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
        except (OSError, EOFError, zlib.error) as e:  # EOFError: a truncated file
            raise InputError(f"{uri}: not valid gzip ({e})") from None
        name = name[:-3]
    return data, name


def _text_values(column: pa.ChunkedArray, what: str) -> tuple[list[str | None], list[str | None]]:
    """A column as text values, and per row why it is not text (None: fine).

    Numbers become their string form; bytes must be UTF-8; lists and records
    are refused per row (``bad_caption: …``), never for the whole list.
    """
    t = column.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return column.to_pylist(), [None] * len(column)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t):
        return column.cast(pa.string()).to_pylist(), [None] * len(column)
    values: list[str | None] = []
    problems: list[str | None] = []
    for v in column.to_pylist():
        problem = None
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                v, problem = None, f"bad_{what}: not UTF-8 text"
        elif v is not None and not isinstance(v, str):
            v, problem = None, f"bad_{what}: a {type(v).__name__}, not text"
        values.append(v)
        problems.append(problem)
    return values, problems


def _utf8_safe(table: pa.Table) -> pa.Table:
    """String columns read without UTF-8 checks, as binary where a value is not valid UTF-8."""
    cols = []
    for col in table.columns:
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            try:
                col.validate(full=True)
            except pa.ArrowInvalid:
                col = col.cast(pa.binary(), safe=False)
        cols.append(col)
    return pa.table(cols, names=table.column_names)


def read_url_list(
    uri: str,
    url_col: str = "url",
    caption_col: str | None = "caption",
    label_col: str | None = None,
    used: set[str] | None = None,
) -> pa.Table:
    """A URL list (parquet, CSV, TSV, JSONL, or plain text one URL per line; optionally .gz).

    Columns other than url/caption/label are kept; names that clash with index
    columns get a ``src_`` prefix so they never overwrite measured values.
    URLs are stripped and their scheme lower-cased. A row whose URL, caption or
    label is not text gets its reason in the internal ``INPUT_ERROR`` column
    and becomes a failure row, not a failed list. Keys avoid ``used`` (the keys
    a dataset already holds, when appending).
    """
    data, name = _read_list_bytes(uri)
    try:
        if name.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
        elif name.endswith((".csv", ".tsv")):
            delimiter = "," if name.endswith(".csv") else "\t"
            table = pacsv.read_csv(io.BytesIO(data), parse_options=pacsv.ParseOptions(delimiter=delimiter),
                                   convert_options=pacsv.ConvertOptions(check_utf8=False))
        elif name.endswith((".jsonl", ".json")):
            table = pajson.read_json(io.BytesIO(data))
        else:  # .txt: one URL per line
            lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
            table = pa.table({url_col: lines})
    except pa.ArrowInvalid as e:
        raise InputError(f"{uri}: cannot parse as {posixpath.splitext(name)[1]}: {e}") from e
    table = _utf8_safe(table)
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
    raw_sources, problems = _text_values(table["source"], "url")
    sources = [normalize_source(s) for s in raw_sources]
    table = table.set_column(table.column_names.index("source"), "source", pa.array(sources, pa.string()))
    for name in ("caption", "label"):
        if name in table.column_names:
            values, bad = _text_values(table[name], name)
            problems = [p or b for p, b in zip(problems, bad)]
            table = table.set_column(table.column_names.index(name), name, pa.array(values, pa.string()))
    for i, col in enumerate(table.columns):  # other columns: metadata; undecodable bytes shown, not fatal
        if pa.types.is_binary(col.type) and table.column_names[i] not in ("source", "caption", "label"):
            text = [None if v is None else v.decode("utf-8", "replace") for v in col.to_pylist()]
            table = table.set_column(i, table.column_names[i], pa.array(text, pa.string()))
    if any(problems):
        table = table.append_column(INPUT_ERROR, pa.array(problems, pa.string()))
    return table.append_column("key", pa.array(unique_keys(sources, used), pa.string()))


def extra_columns(table: pa.Table) -> pa.Schema:
    """Schema of the input columns that are not index columns (kept as metadata)."""
    return pa.schema([f for f in table.schema if f.name not in CORE_COLUMNS and f.name != INPUT_ERROR])
