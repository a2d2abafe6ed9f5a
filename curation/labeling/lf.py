"""Labelling functions: the decorator, a registry, and loading an LF file.

An LF takes one sample record (see ``records.Record``: attribute and item
access to caption, url/source, index/json metadata and sidecar fields) and
returns a class index, a class name, or ``ABSTAIN`` (-1).

Snorkel compatibility: objects made by ``snorkel.labeling.labeling_function``
(or anything with a string ``.name`` that is callable on one record) are LFs
too and run unchanged, because a record supports ``x.field`` like the pandas
row Snorkel passes.

LF files are plain Python modules. ``load_lf_file`` executes one from its
source text (local path or ``s3://``); the text, not a pickled function, is
what travels to Ray workers, so a file needs no installation on a cluster.
"""
from __future__ import annotations

import hashlib
import keyword
import re
import sys
import threading
import traceback
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from webcurate.shards.errors import ConfigError

ABSTAIN = -1

# Column names the votes sidecar uses itself; an LF may not take them.
RESERVED_NAMES = frozenset({"key", "lf_errors"})
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


class LFError(ConfigError):
    """An LF file or LF is unusable (import failure, bad name, bad output)."""


class LabelingFunction:
    """One labelling function: ``f(record, **resources) -> class | ABSTAIN``.

    ``pre``: callables applied to the record first (Snorkel's preprocessors).
    ``batch``: optional vectorised form ``batch(records, **resources) -> (n,)``
    int array; the applier uses it when present and falls back to per-record
    calls if it raises, so per-sample errors are still attributed.
    """

    def __init__(
        self,
        name: str,
        f: Callable[..., Any],
        resources: dict[str, Any] | None = None,
        pre: Sequence[Callable[[Any], Any]] | None = None,
        batch: Callable[..., Any] | None = None,
    ):
        self.name = name
        self._f = f
        self._resources = dict(resources or {})
        self._pre = list(pre or [])
        self._batch = batch

    def __call__(self, x: Any) -> Any:
        for p in self._pre:
            x = p(x)
        return self._f(x, **self._resources)

    def batch(self, records: Sequence[Any]) -> Any:
        """Votes for many records at once; only valid when ``has_batch``."""
        if self._batch is None:
            raise AttributeError(f"LF `{self.name}` has no batch form")
        return self._batch(records, **self._resources)

    @property
    def has_batch(self) -> bool:
        return self._batch is not None and not self._pre

    def __repr__(self) -> str:
        return f"LabelingFunction({self.name!r})"


# Every LF made by the decorator or a factory, by name (last one wins). Handy
# for the Python API; loading a file does not rely on it (see discover_lfs).
_REGISTRY: dict[str, LabelingFunction] = {}
_REGISTRY_LOCK = threading.Lock()


def register(lf: LabelingFunction) -> LabelingFunction:
    with _REGISTRY_LOCK:
        _REGISTRY[lf.name] = lf
    return lf


def registered_lfs() -> list[LabelingFunction]:
    """All LFs created in this process so far, in creation order."""
    with _REGISTRY_LOCK:
        return list(_REGISTRY.values())


def labeling_function(
    name: str | None = None,
    resources: dict[str, Any] | None = None,
    pre: Sequence[Callable[[Any], Any]] | None = None,
) -> Callable[[Callable[..., Any]], LabelingFunction]:
    """Decorator turning ``f(x, **resources)`` into a ``LabelingFunction``.

    Same signature as Snorkel's: ``name`` defaults to the function's name,
    ``resources`` are passed as keyword arguments on every call, ``pre`` are
    preprocessors applied to the record first.
    """
    if callable(name) and resources is None and pre is None:
        raise TypeError("use @labeling_function() with parentheses, as in Snorkel")

    def wrap(f: Callable[..., Any]) -> LabelingFunction:
        return register(LabelingFunction(name or f.__name__, f, resources=resources, pre=pre))

    return wrap


def is_lf_like(obj: Any) -> bool:
    """True for our LFs, Snorkel's, and duck-typed ones (callable, ``.name`` str)."""
    if isinstance(obj, LabelingFunction):
        return True
    if isinstance(obj, (type, types.FunctionType, types.ModuleType, types.BuiltinFunctionType, types.MethodType)):
        return False
    return callable(obj) and isinstance(getattr(obj, "name", None), str)


def lf_name(lf: Any) -> str:
    return str(getattr(lf, "name"))


def validate_lfs(lfs: Sequence[Any], where: str = "LF list") -> list[Any]:
    """Check LF objects and names (unique, usable as column names)."""
    if not lfs:
        raise LFError(f"{where}: no labelling functions found (decorate functions with "
                      "@labeling_function() or list them in LFS = [...])")
    seen: dict[str, int] = {}
    for i, lf in enumerate(lfs):
        if not is_lf_like(lf):
            raise LFError(f"{where}: item {i} ({lf!r}) is not a labelling function "
                          "(needs a string .name and to be callable on a record)")
        name = lf_name(lf)
        if not _NAME_RE.match(name) or keyword.iskeyword(name):
            raise LFError(f"{where}: LF name {name!r} is not usable as a column name "
                          "(letters, digits, _ . - ; not starting with a digit)")
        if name in RESERVED_NAMES:
            raise LFError(f"{where}: LF name {name!r} is reserved; rename the LF")
        if name in seen:
            raise LFError(f"{where}: two LFs are named {name!r}; LF names must be unique")
        seen[name] = i
    return list(lfs)


def discover_lfs(namespace: dict[str, Any]) -> list[Any]:
    """LFs of a module namespace: ``LFS`` when defined, else every LF object
    bound at top level (directly or inside a top-level list/tuple/dict), in
    definition order, each once."""
    if "LFS" in namespace:
        lfs = namespace["LFS"]
        if not isinstance(lfs, (list, tuple)):
            raise LFError("LFS must be a list of labelling functions")
        return list(lfs)
    out: list[Any] = []
    ids: set[int] = set()

    def add(obj: Any) -> None:
        if is_lf_like(obj) and id(obj) not in ids:
            ids.add(id(obj))
            out.append(obj)

    for name, value in namespace.items():
        if name.startswith("__"):
            continue
        if isinstance(value, (list, tuple)):
            for v in value:
                add(v)
        elif isinstance(value, dict):
            for v in value.values():
                add(v)
        else:
            add(value)
    return out


@dataclass
class LFSet:
    """The LFs to apply, with where they came from.

    ``source``/``path`` are set when they came from a file (what workers
    re-execute); ``classes`` is the file's ``CLASSES`` when it has one.
    """

    lfs: list[Any]
    classes: list[str] | None = None
    source: str | None = None
    path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [lf_name(lf) for lf in self.lfs]

    @property
    def sha(self) -> str:
        """Fingerprint of the LF code: changes restart the votes stage."""
        return source_sha(self.source if self.source is not None else "\n".join(self.names))


def source_sha(source: str) -> str:
    """The fingerprint ``LFSet.sha`` gives LF source text, without executing it."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]


# Modules executed from LF source in this process, by source hash: a Ray
# worker runs many shard tasks and should import the file (and load its seed
# sets) once.
_MODULE_CACHE: dict[tuple[str, str], types.ModuleType] = {}
_MODULE_LOCK = threading.Lock()


def module_from_source(source: str, path: str) -> types.ModuleType:
    """Execute LF source text as a module (cached per process); clear errors."""
    key = (hashlib.sha256(source.encode("utf-8")).hexdigest(), path)
    with _MODULE_LOCK:
        if key in _MODULE_CACHE:
            return _MODULE_CACHE[key]
        mod_name = f"webcurate_lfs_{key[0][:12]}"
        mod = types.ModuleType(mod_name)
        mod.__file__ = path
        # Registered so dataclasses/pickling inside the file can find the module.
        sys.modules[mod_name] = mod
        try:
            code = compile(source, path, "exec")
            exec(code, mod.__dict__)
        except SyntaxError as e:
            sys.modules.pop(mod_name, None)
            raise LFError(f"LF file {path} has a syntax error at line {e.lineno}: {e.msg}") from e
        except BaseException as e:  # ImportError, NameError, anything at import time
            sys.modules.pop(mod_name, None)
            line = _user_line(e, path)
            raise LFError(f"LF file {path} does not import: {type(e).__name__}: {e}{line}") from e
        _MODULE_CACHE[key] = mod
        return mod


def _user_line(e: BaseException, path: str) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
    return f" (line {frames[-1].lineno})" if frames else ""


def read_source(path: str) -> str:
    """The text of an LF file (local path or s3:// URI)."""
    from webcurate.shards import storage

    try:
        data = storage.read_bytes(path)
    except FileNotFoundError as e:
        raise LFError(f"LF file {path} does not exist") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LFError(f"LF file {path} is not UTF-8 text") from e


def lfset_from_source(source: str, path: str) -> LFSet:
    """Execute LF source and collect its LFs and ``CLASSES``."""
    mod = module_from_source(source, path)
    ns = mod.__dict__
    lfs = validate_lfs(discover_lfs(ns), where=f"LF file {path}")
    classes = ns.get("CLASSES")
    if classes is not None:
        if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
            raise LFError(f"LF file {path}: CLASSES must be a list of class-name strings")
        classes = list(classes)
    return LFSet(lfs=lfs, classes=classes, source=source, path=path)


def load_lf_file(path: str) -> LFSet:
    """Load the LFs (and ``CLASSES``) of a Python file by path or ``s3://`` URI."""
    return lfset_from_source(read_source(path), path)


def resolve_classes(
    cli_classes: Iterable[str] | None,
    config_classes: Iterable[str] | None,
    file_classes: Iterable[str] | None,
) -> list[str]:
    """Class names from ``--classes``, the config's ``classes:``, or the LF
    file's ``CLASSES``; when several are given they must agree."""
    given = [(src, list(c)) for src, c in (("--classes", cli_classes), ("config `classes:`", config_classes),
                                           ("the LF file's CLASSES", file_classes)) if c]
    if not given:
        raise ConfigError("no class names: pass --classes a,b,c, set `classes:` in the config, "
                          "or define CLASSES = [...] in the LF file")
    src0, classes = given[0]
    for src, other in given[1:]:
        if other != classes:
            raise ConfigError(f"class names disagree: {src0} says {classes}, {src} says {other}")
    if len(set(classes)) != len(classes):
        raise ConfigError(f"class names repeat in {src0}: {classes}")
    if len(classes) < 2:
        raise ConfigError(f"need at least 2 classes, {src0} gives {classes}")
    return classes


def coerce_vote(value: Any, lf: str, classes: Sequence[str]) -> int:
    """Turn an LF's return value into a class index or ABSTAIN.

    Accepts ints (numpy ints too), class-name strings, and None (abstain).
    Raises ``ValueError`` naming the LF for anything else, so the applier can
    record it as that (LF, sample)'s error.
    """
    k = len(classes)
    if value is None:
        return ABSTAIN
    if isinstance(value, bool):
        raise ValueError(f"LF `{lf}` returned a bool ({value}); return a class index or ABSTAIN (-1)")
    if isinstance(value, str):
        try:
            return classes.index(value)
        except ValueError:
            raise ValueError(f"LF `{lf}` returned {value!r}, which is not a class name ({list(classes)})") from None
    try:
        iv = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"LF `{lf}` returned {value!r} ({type(value).__name__}); "
                         "return a class index or ABSTAIN (-1)") from None
    if iv != value or not (-1 <= iv < k):
        raise ValueError(f"LF `{lf}` returned {value!r}, not a class index in [-1, {k - 1}] "
                         f"(classes: {list(classes)})")
    return iv
