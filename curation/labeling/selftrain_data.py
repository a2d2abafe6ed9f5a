"""What ``webcurate selftrain`` reads: embeddings of pool, seeds and dev set, labels, a label-model prior.

Every input is checked before any round runs, with errors that name the
dataset and the field: a seed set with one class, seed/dev embeddings made by
another model than the pool's (``embeddings.model`` / ``weights_sha256`` /
``image_size`` in the manifest, or another width), a dev set with class
names outside the class list, a ``--labels`` run with other classes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from webcurate.shards.dataset import Dataset, DatasetError
from webcurate.shards.errors import ConfigError

from .records import embedding_matrix
from .selftrain import NONE, SelfTrainData

EMBED_STAGE = "embeddings"
MODEL_FIELDS = ("model", "weights_sha256", "image_size")


@dataclass
class Embedded:
    """One dataset's embeddings: ``keys`` (n,), ``E`` (n, D) float32 (zeros where ``ok`` is False)."""

    uri: str
    keys: list[str]
    E: np.ndarray
    ok: np.ndarray
    model: dict[str, Any]
    stage: str = EMBED_STAGE

    @property
    def dim(self) -> int:
        return int(self.E.shape[1])


def load_embedded(uri: str, what: str, stage: str = EMBED_STAGE) -> Embedded:
    """The vectors sidecar ``stage`` of ``uri`` (every completed shard must have its part)."""
    ds = Dataset(uri)
    ds.manifest  # a clear error when it is not a dataset
    shards, have = ds.completed_shards(), set(ds.sidecar_completed(stage))
    if not shards:
        raise DatasetError(f"{what} {uri} has no completed shards")
    missing = [s for s in shards if s not in have]
    if missing:
        raise DatasetError(f"{what} {uri} has no `{stage}` for {len(missing)} of {len(shards)} shards (e.g. shard "
                           f"{missing[0]:05d}); run `webcurate embed --input {uri}` with the pool's model first")
    table = ds.read_sidecar(stage, columns=["key", "embedding"])
    E = embedding_matrix(table.column("embedding"))
    ok = ~np.isnan(E).any(axis=1) if E.size else np.zeros(len(E), bool)
    E = np.where(ok[:, None], E, 0.0).astype(np.float32)
    params = ds.manifest.get("stages", {}).get(stage, {}).get("parameters", {})
    return Embedded(uri, table.column("key").to_pylist(), E, ok, {k: params.get(k) for k in MODEL_FIELDS}, stage)


def check_same_model(pool: Embedded, other: Embedded, what: str) -> None:
    """Seed/dev embeddings must come from the pool's model: same width and manifest fingerprint."""
    if other.dim != pool.dim:
        raise ConfigError(f"{what} {other.uri}: field `embedding` has dimension {other.dim}, the pool's "
                          f"({pool.uri}) has {pool.dim}: embed both with the same model")
    for f in MODEL_FIELDS:
        a, b = pool.model.get(f), other.model.get(f)
        if a is not None and b is not None and a != b:
            raise ConfigError(f"{what} {other.uri}: field `{pool.stage}.{f}` is {str(b)[:24]!r}, the pool's is "
                              f"{str(a)[:24]!r}: seed, dev and pool must be embedded by the same model")


def labels_by_key(uri: str, keys: Sequence[str], field: str = "label") -> list[str | None]:
    """The ``field`` of each key's ok index row (None where unlabelled or missing)."""
    index = Dataset(uri).index(columns=None)
    if field not in index.column_names:
        raise ConfigError(f"{uri} has no `{field}` field: a labelled dataset needs one (class names)")
    rows = zip(index.column("key").to_pylist(), index.column(field).to_pylist(), index.column("status").to_pylist())
    of = {k: v for k, v, s in rows if s == "ok"}
    return [of.get(k) for k in keys]


def resolve_classes(given: Sequence[str] | None, seed_labels: Sequence[str | None], prior_classes: list[str] | None,
                    seed_uri: str) -> list[str]:
    """Class names: ``--classes``, else the label-model run's, else the seed set's (sorted)."""
    present = sorted({x for x in seed_labels if x is not None})
    classes = list(given) if given else (prior_classes or present)
    if len(set(classes)) != len(classes):
        raise ConfigError(f"class names repeat: {classes}")
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise ConfigError(f"seed dataset {seed_uri}: field `label` has class names not in the class list "
                          f"{classes}: {unknown[:10]}")
    if len(present) < 2:
        raise ConfigError(f"seed dataset {seed_uri}: field `label` holds {len(present)} class(es) "
                          f"({', '.join(present) or 'none'}); self-training needs seeds of at least 2 classes")
    if prior_classes is not None and prior_classes != classes:
        raise ConfigError(f"--labels run has classes {prior_classes}, this run {classes}: field `label_classes` "
                          "must match")
    return classes


def dev_targets(labels: Sequence[str | None], classes: Sequence[str], none_label: str, uri: str) -> np.ndarray:
    """(d,) dev classes; ``NONE`` for ``none_label`` samples, -1 where unlabelled."""
    if none_label in classes:
        raise ConfigError(f"--none-label {none_label!r} is also a class name; choose another")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({x for x in labels if x is not None and x not in index and x != none_label})
    if unknown:
        raise ConfigError(f"dev dataset {uri}: field `label` has class names not in the class list {list(classes)}: "
                          f"{unknown[:10]} (label 'no class' samples {none_label!r})")
    y = np.array([NONE if x == none_label else index.get(x, -1) if x is not None else -1 for x in labels], np.int64)
    if not (y >= 0).any():
        raise ConfigError(f"dev dataset {uri}: no sample has a class in field `label`")
    return y


def load_prior(uri: str, pool_keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Label-model posteriors of a ``webcurate label`` run: (n, K) probs, (n,) voted, its classes."""
    from webcurate.shards import storage

    from .pseudo_dataset import PSEUDO_LABELS_FILE

    m = Dataset(uri).manifest
    if m.get("stage") != "label":
        raise ConfigError(f"--labels {uri} is not the output of `webcurate label` (stage {m.get('stage')!r})")
    classes = list(m.get("parameters", {}).get("label_classes") or [])
    t = storage.read_parquet(storage.join(uri, PSEUDO_LABELS_FILE), ["key", "probs", "label_index"])
    pos = {k: i for i, k in enumerate(pool_keys)}
    rows = np.array([pos.get(k, -1) for k in t.column("key").to_pylist()])
    hit = rows >= 0
    if not hit.any():
        raise ConfigError(f"--labels {uri} labels none of the input's samples: was it made from this --input?")
    probs = np.asarray(t.column("probs").combine_chunks().flatten(), np.float64).reshape(len(rows), len(classes))
    voted = np.asarray(t.column("label_index"), np.int64) >= 0
    P = np.full((len(pool_keys), len(classes)), 1.0 / len(classes))
    ok = np.zeros(len(pool_keys), bool)
    P[rows[hit]], ok[rows[hit]] = probs[hit], voted[hit]
    return P, ok, classes


def _keys_sha(*key_lists: Sequence[str]) -> str:
    h = hashlib.sha256()
    for keys in key_lists:
        h.update(json.dumps(list(keys)).encode())
    return h.hexdigest()[:16]


def load_inputs(input_uri: str, seed_uri: str, dev_uri: str | None, labels_uri: str | None,
                classes: Sequence[str] | None, none_label: str, stage: str = EMBED_STAGE
                ) -> tuple[SelfTrainData, dict[str, Any]]:
    """All arrays of a run and the identity of its inputs (for the resume fingerprint)."""
    pool = load_embedded(input_uri, "input dataset", stage)
    seed = load_embedded(seed_uri, "seed dataset", stage)
    check_same_model(pool, seed, "seed dataset")
    seed_labels = labels_by_key(seed_uri, seed.keys)
    prior = prior_ok = prior_classes = None
    if labels_uri:
        prior, prior_ok, prior_classes = load_prior(labels_uri, pool.keys)
    cls = resolve_classes(classes, seed_labels, prior_classes, seed_uri)
    keep = np.array([lab is not None for lab in seed_labels]) & seed.ok
    seed_y = np.array([cls.index(lab) for lab, k in zip(seed_labels, keep) if k], np.int64)
    data = SelfTrainData(cls, pool.keys, pool.E, pool.ok, seed.E[keep], seed_y, prior=prior, prior_ok=prior_ok)
    identity = {"pool": _keys_sha(pool.keys), "seed": _keys_sha(seed.keys, seed_labels), "model": pool.model,
                "classes": cls}
    if dev_uri:
        dev = load_embedded(dev_uri, "dev dataset", stage)
        check_same_model(pool, dev, "dev dataset")
        dev_labels = labels_by_key(dev_uri, dev.keys)
        y = dev_targets(dev_labels, cls, none_label, dev_uri)
        use = (y != -1) & dev.ok
        data.dev, data.dev_y = dev.E[use], y[use]
        identity["dev"] = _keys_sha(dev.keys, dev_labels)
    if labels_uri:
        identity["labels"] = _keys_sha([str(v) for v in np.round(prior, 5).ravel()[:100_000]])
    return data, identity
