"""Built-in LF factories: text rules, URL rules, size rules, embedding votes.

Each factory returns ready ``LabelingFunction`` objects (one, or one per
class). Labels may be given as class names or indices; ``classes`` turns names
into indices. Embedding-based LFs (kNN vote, prototype similarity) have a
vectorised ``batch`` form the applier uses per shard, and abstain on records
whose embedding is missing (failed to embed); a record lacking the field
altogether (no ``embeddings`` sidecar) raises, which the applier records.

Seed sets for the embedding LFs are our own labelled datasets (``label`` =
class name in the index) with an ``embeddings`` sidecar made by the same
model as the dataset being labelled: ``load_seed(uri, classes)``.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

import numpy as np

from webcurate.shards.errors import ConfigError

from .lf import ABSTAIN, LabelingFunction, register


def class_index(label: int | str, classes: Sequence[str] | None, what: str = "label") -> int:
    """A class name or index -> index, with an error naming the bad value."""
    if isinstance(label, str):
        if classes is None:
            raise ConfigError(f"{what} {label!r} is a class name but no class list was given")
        if label not in classes:
            raise ConfigError(f"{what} {label!r} is not one of the classes {list(classes)}")
        return list(classes).index(label)
    idx = int(label)
    if classes is not None and not 0 <= idx < len(classes):
        raise ConfigError(f"{what} {idx} is out of range for {len(classes)} classes")
    return idx


def _text(x: Any, field: str) -> str:
    v = x[field]  # missing field raises, naming it
    return "" if v is None else str(v)


# -- text --------------------------------------------------------------------
def regex_lf(pattern: str, label: int | str, classes: Sequence[str] | None = None, *,
             field: str = "caption", name: str | None = None, flags: int = re.IGNORECASE) -> LabelingFunction:
    """Votes ``label`` when ``pattern`` matches the record's ``field`` (search), else abstains."""
    y = class_index(label, classes)
    try:
        rx = re.compile(pattern, flags)
    except re.error as e:
        raise ConfigError(f"regex {pattern!r} for LF {name or label!r} is invalid: {e}") from e
    lf_name_ = name or f"regex_{field}_{classes[y] if classes else y}"

    def f(x: Any) -> int:
        return y if rx.search(_text(x, field)) else ABSTAIN

    return register(LabelingFunction(lf_name_, f))


def keyword_lfs(keywords: Mapping[int | str, Sequence[str]], classes: Sequence[str] | None = None, *,
                field: str = "caption", prefix: str = "keyword", case_sensitive: bool = False) -> list[LabelingFunction]:
    """One LF per class: votes the class when any of its keywords occurs as a
    whole word (or phrase) in ``field``. ``keywords``: {class: [words]}."""
    out = []
    for label, words in keywords.items():
        if isinstance(words, str):
            words = [words]
        if not words:
            raise ConfigError(f"keyword list for class {label!r} is empty")
        y = class_index(label, classes, what="keyword class")
        pattern = r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b"
        cname = classes[y] if classes else str(y)
        out.append(regex_lf(pattern, y, classes, field=field, name=f"{prefix}_{cname}",
                            flags=0 if case_sensitive else re.IGNORECASE))
    return out


def caption_regex_lfs(patterns: Mapping[int | str, str | Sequence[str]], classes: Sequence[str] | None = None, *,
                      field: str = "caption", prefix: str = "regex") -> list[LabelingFunction]:
    """One LF per class from ``{class: regex or [regexes]}`` (alternatives OR-ed)."""
    out = []
    for label, pats in patterns.items():
        pats = [pats] if isinstance(pats, str) else list(pats)
        y = class_index(label, classes, what="regex class")
        cname = classes[y] if classes else str(y)
        out.append(regex_lf("|".join(f"(?:{p})" for p in pats), y, classes, field=field, name=f"{prefix}_{cname}"))
    return out


# -- URLs ----------------------------------------------------------------------
def url_regex_lf(pattern: str, label: int | str, classes: Sequence[str] | None = None, *,
                 name: str | None = None, field: str = "url") -> LabelingFunction:
    """Votes ``label`` when ``pattern`` matches the record's URL (``url``, i.e. source)."""
    y = class_index(label, classes)
    return regex_lf(pattern, y, classes, field=field,
                    name=name or f"url_{classes[y] if classes else y}")


def _host(url: str) -> str:
    host = urlparse(url if "://" in url else f"//{url}").hostname or ""
    return host.lower().rstrip(".")


def domain_lf(domains: Mapping[str, int | str], classes: Sequence[str] | None = None, *,
              name: str = "domain", field: str = "url") -> LabelingFunction:
    """Votes the class mapped to the URL's domain: ``{"birds.example.org": "bird"}``.

    A domain matches itself and its subdomains; the longest match wins.
    """
    table = {d.lower().strip(".").removeprefix("www."): class_index(c, classes, what=f"domain {d!r} class")
             for d, c in domains.items()}
    if not table:
        raise ConfigError("domain_lf needs at least one domain")

    def f(x: Any) -> int:
        host = _host(_text(x, field)).removeprefix("www.")
        parts = host.split(".")
        for i in range(len(parts)):  # longest suffix first
            hit = table.get(".".join(parts[i:]))
            if hit is not None:
                return hit
        return ABSTAIN

    return register(LabelingFunction(name, f))


# -- size / shape -----------------------------------------------------------------
def size_lf(label: int | str, classes: Sequence[str] | None = None, *, name: str | None = None,
            min_width: int | None = None, max_width: int | None = None,
            min_height: int | None = None, max_height: int | None = None,
            min_aspect: float | None = None, max_aspect: float | None = None) -> LabelingFunction:
    """Votes ``label`` when every given bound holds for the record's width,
    height and aspect (width / height); abstains otherwise or when the size
    is unknown."""
    y = class_index(label, classes)
    bounds = dict(min_width=min_width, max_width=max_width, min_height=min_height, max_height=max_height,
                  min_aspect=min_aspect, max_aspect=max_aspect)
    if all(v is None for v in bounds.values()):
        raise ConfigError("size_lf needs at least one bound")

    def f(x: Any) -> int:
        w, h = x.get("width"), x.get("height")
        if not w or not h:
            return ABSTAIN
        a = w / h
        checks = [
            (min_width is None or w >= min_width), (max_width is None or w <= max_width),
            (min_height is None or h >= min_height), (max_height is None or h <= max_height),
            (min_aspect is None or a >= min_aspect), (max_aspect is None or a <= max_aspect),
        ]
        return y if all(checks) else ABSTAIN

    return register(LabelingFunction(name or f"size_{classes[y] if classes else y}", f))


# -- seed sets and embeddings ---------------------------------------------------------
@dataclass
class Seed:
    """A small labelled set in embedding space.

    ``embeddings``: (S, D) float32, L2-normalised; ``labels``: (S,) class
    indices into ``classes``; ``keys``: the seed samples' keys.
    """

    embeddings: np.ndarray
    labels: np.ndarray
    classes: list[str]
    keys: list[str]

    @classmethod
    def from_arrays(cls, embeddings: np.ndarray, labels: Sequence[int | str], classes: Sequence[str],
                    keys: Sequence[str] | None = None) -> "Seed":
        e = np.asarray(embeddings, dtype=np.float32)
        if e.ndim != 2 or e.shape[0] == 0:
            raise ConfigError(f"seed embeddings must be a non-empty (S, D) array, got shape {e.shape}")
        y = np.array([class_index(v, classes, what="seed label") for v in labels], dtype=np.int64)
        if len(y) != e.shape[0]:
            raise ConfigError(f"{len(y)} seed labels for {e.shape[0]} seed embeddings")
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        return cls(e, y, list(classes), list(keys) if keys is not None else [str(i) for i in range(len(y))])


def load_seed(uri: str, classes: Sequence[str], *, stage: str = "embeddings", label_field: str = "label") -> Seed:
    """A labelled seed dataset's embeddings and labels (class names in ``label_field``).

    Unknown class names raise a ``ConfigError`` naming them and the field;
    samples without a label or embedding are left out.
    """
    from webcurate.shards.dataset import Dataset, DatasetError

    from .records import embedding_matrix

    ds = Dataset(uri)
    index = ds.index(columns=["key", label_field, "status"]) if ds.completed_shards() else None
    if index is None or index.num_rows == 0:
        raise DatasetError(f"seed dataset {uri} has no samples")
    if label_field not in index.column_names:
        raise DatasetError(f"seed dataset {uri} has no `{label_field}` column")
    label_of = {k: v for k, v, s in zip(index.column("key").to_pylist(), index.column(label_field).to_pylist(),
                                        index.column("status").to_pylist()) if s == "ok" and v is not None}
    unknown = sorted({v for v in label_of.values() if v not in classes})
    if unknown:
        raise ConfigError(f"seed dataset {uri}: field `{label_field}` has class names not in the class list "
                          f"{list(classes)}: {unknown[:10]}")
    table = ds.read_sidecar(stage, columns=["key", "embedding"])
    E = embedding_matrix(table.column("embedding"))
    keys = table.column("key").to_pylist()
    keep = [i for i, k in enumerate(keys) if k in label_of and not np.isnan(E[i]).any()]
    if not keep:
        raise DatasetError(f"seed dataset {uri} has no labelled sample with an embedding")
    return Seed.from_arrays(E[keep], [label_of[keys[i]] for i in keep], classes, [keys[i] for i in keep])


def _query_matrix(records: Any, field: str) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) normalised embeddings of a record batch and a (n,) validity mask."""
    cols = getattr(records, "columns", {})
    if field in cols:
        E = np.asarray(cols[field], dtype=np.float32)
    else:
        if any(field not in r for r in records):
            raise KeyError(f"records have no field {field!r}")
        rows = [r[field] for r in records]
        d = next((len(v) for v in rows if v is not None), 0)
        E = np.stack([np.full(d, np.nan, np.float32) if v is None else np.asarray(v, np.float32) for v in rows]) \
            if rows else np.zeros((0, d), np.float32)
    valid = ~np.isnan(E).any(axis=1) if E.size else np.zeros(len(E), dtype=bool)
    E = np.where(valid[:, None], E, 0.0).astype(np.float32)
    E /= np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)
    return E, valid


def _single(x: Any, field: str) -> np.ndarray | None:
    v = x[field]
    if v is None:
        return None
    e = np.asarray(v, dtype=np.float32)
    if np.isnan(e).any():
        return None
    return e / max(float(np.linalg.norm(e)), 1e-12)


def knn_votes(E: np.ndarray, seed: Seed, k: int, margin: float, min_similarity: float | None) -> np.ndarray:
    """kNN vote of (n, D) normalised queries against the seed: (n,) votes.

    Each of the k most similar seeds votes for its class with weight
    max(cosine, 0); the LF votes the top class when its share of the weight
    beats the runner-up's by ``margin`` (and the nearest seed is at least
    ``min_similarity`` similar), else abstains.
    """
    n, K = E.shape[0], len(seed.classes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = min(k, seed.embeddings.shape[0])
    sims = E @ seed.embeddings.T  # (n, S)
    idx = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else np.tile(np.arange(k), (n, 1))
    top = np.take_along_axis(sims, idx, axis=1)  # (n, k)
    w = np.maximum(top, 0.0)
    scores = np.zeros((n, K))
    np.add.at(scores, (np.repeat(np.arange(n), k), seed.labels[idx].reshape(-1)), w.reshape(-1))
    tot = scores.sum(axis=1)
    share = scores / np.maximum(tot, 1e-12)[:, None]
    order = np.sort(share, axis=1)
    best = np.argmax(share, axis=1)
    ok = (tot > 0) & (order[:, -1] - order[:, -2] >= margin)
    if min_similarity is not None:
        ok &= top.max(axis=1) >= min_similarity
    return np.where(ok, best, ABSTAIN)


def knn_lf(seed: Seed, *, k: int = 5, margin: float = 0.2, min_similarity: float | None = None,
           name: str = "knn_seed", field: str = "embedding") -> LabelingFunction:
    """kNN vote from a labelled seed set in embedding space, with a margin (see ``knn_votes``)."""
    if k < 1:
        raise ConfigError("knn_lf: k must be at least 1")

    def f(x: Any) -> int:
        e = _single(x, field)
        if e is None:
            return ABSTAIN
        return int(knn_votes(e[None, :], seed, k, margin, min_similarity)[0])

    def batch(records: Any) -> np.ndarray:
        E, valid = _query_matrix(records, field)
        return np.where(valid, knn_votes(E, seed, k, margin, min_similarity), ABSTAIN)

    return register(LabelingFunction(name, f, batch=batch))


def class_prototypes(seed: Seed) -> np.ndarray:
    """(K, D) normalised mean seed embedding per class (zero rows for classes without seeds)."""
    K, D = len(seed.classes), seed.embeddings.shape[1]
    P = np.zeros((K, D), dtype=np.float32)
    np.add.at(P, seed.labels, seed.embeddings)
    return P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-12)


def prototype_votes(E: np.ndarray, P: np.ndarray, margin: float, min_similarity: float | None) -> np.ndarray:
    """Votes of (n, D) queries by cosine to (K, D) prototypes: top class when
    it beats the runner-up by ``margin`` (and reaches ``min_similarity``)."""
    if E.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    sims = E @ P.T
    has = np.linalg.norm(P, axis=1) > 0
    sims[:, ~has] = -np.inf
    order = np.sort(sims, axis=1)
    best = np.argmax(sims, axis=1)
    ok = order[:, -1] - order[:, -2] >= margin
    if min_similarity is not None:
        ok &= order[:, -1] >= min_similarity
    return np.where(ok, best, ABSTAIN)


def prototype_lf(seed: Seed, *, margin: float = 0.02, min_similarity: float | None = None,
                 name: str = "prototype", field: str = "embedding") -> LabelingFunction:
    """Prototype similarity: cosine to each class's mean seed embedding."""
    P = class_prototypes(seed)
    if int((np.linalg.norm(P, axis=1) > 0).sum()) < 2:
        raise ConfigError("prototype_lf needs seeds of at least 2 classes")

    def f(x: Any) -> int:
        e = _single(x, field)
        if e is None:
            return ABSTAIN
        return int(prototype_votes(e[None, :], P, margin, min_similarity)[0])

    def batch(records: Any) -> np.ndarray:
        E, valid = _query_matrix(records, field)
        return np.where(valid, prototype_votes(E, P, margin, min_similarity), ABSTAIN)

    return register(LabelingFunction(name, f, batch=batch))


# -- clusters ---------------------------------------------------------------------------
def cluster_labels_from_members(cluster_ids: Sequence[int], labels: Sequence[int], *,
                                min_members: int = 1, min_purity: float = 0.6) -> dict[int, int]:
    """Label clusters by their labelled members: {cluster: class} for clusters
    with at least ``min_members`` labelled members whose majority class holds
    at least ``min_purity`` of them (ties: lower class index)."""
    votes: dict[int, dict[int, int]] = {}
    for c, y in zip(cluster_ids, labels):
        if c is None or int(c) < 0 or y is None or int(y) < 0:
            continue
        d = votes.setdefault(int(c), {})
        d[int(y)] = d.get(int(y), 0) + 1
    out = {}
    for c, d in votes.items():
        n = sum(d.values())
        y, top = min(d.items(), key=lambda kv: (-kv[1], kv[0]))
        if n >= min_members and top / n >= min_purity:
            out[c] = y
    return out


def cluster_vote_lf(cluster_labels: Mapping[int, int | str], classes: Sequence[str] | None = None, *,
                    level: str = "level_1", name: str | None = None) -> LabelingFunction:
    """Votes the class given to the record's cluster at ``level`` (a clusters
    sidecar field), abstains for unlabelled clusters."""
    table = {int(c): class_index(y, classes, what=f"cluster {c} class") for c, y in cluster_labels.items()}

    def f(x: Any) -> int:
        c = x[level]
        if c is None:
            return ABSTAIN
        return table.get(int(c), ABSTAIN)

    return register(LabelingFunction(name or f"cluster_{level}", f))


def load_centroids(root: str, level: int) -> np.ndarray:
    """(k, D) centroids of ``level`` saved by the cluster stage (``clusters/centroids_level_<t>.npy``)."""
    from webcurate.shards import storage

    uri = storage.join(root, "clusters", f"centroids_level_{level}.npy")
    try:
        return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
    except FileNotFoundError as e:
        raise ConfigError(f"{uri} does not exist: run `webcurate cluster` on {root} first") from e


def cluster_vote_from_seed(seed: Seed, centroids: np.ndarray, *, level: int = 1, min_members: int = 1,
                           min_purity: float = 0.6, name: str | None = None) -> LabelingFunction:
    """Cluster vote: each seed joins its nearest centroid's cluster; clusters
    are labelled by their seeds (``cluster_labels_from_members``) and the LF
    votes a record's cluster label at ``level_<level>``."""
    C = np.asarray(centroids, dtype=np.float32)
    if C.ndim != 2 or C.shape[1] != seed.embeddings.shape[1]:
        raise ConfigError(f"centroids of shape {C.shape} do not match seed embeddings of dim "
                          f"{seed.embeddings.shape[1]}")
    d2 = (seed.embeddings ** 2).sum(1)[:, None] - 2 * seed.embeddings @ C.T + (C ** 2).sum(1)[None, :]
    assign = np.argmin(d2, axis=1)
    mapping = cluster_labels_from_members(assign, seed.labels, min_members=min_members, min_purity=min_purity)
    return cluster_vote_lf(mapping, seed.classes, level=f"level_{level}", name=name or f"cluster_level_{level}")
