"""Test data for the cluster/sample/export/report/curate tests.

Real JPEGs in real shards (ShardWriter + manifest), plus an ``embeddings``
sidecar written in the embed stage's format (key, embedding
fixed_size_list<float32>[D], status, error), so clustering can be tested on
embeddings whose structure the test controls. Loaded by the tests through
``load_helpers()`` (pytest runs with --import-mode=importlib).
"""
from __future__ import annotations


import numpy as np
import pyarrow as pa

from webcurate.shards import manifest as manifest_mod
from webcurate.shards.dataset import Dataset
from webcurate.shards.writer import ShardWriter
from photos import jpeg_bytes, make_photo


def mixture(dim: int, sizes: list[int], *, spread: float = 0.35, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points from Gaussian blobs with the given sizes, L2-normalised.

    Returns X (sum(sizes), D) float32 and the blob id of each point (int).
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((len(sizes), dim)).astype(np.float32)
    blob = np.repeat(np.arange(len(sizes)), sizes)
    X = centers[blob] + spread * rng.standard_normal((len(blob), dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    perm = rng.permutation(len(blob))
    return np.ascontiguousarray(X[perm]), blob[perm]


def write_dataset(root: str, n: int, *, shard_size: int, image_size: tuple[int, int] = (48, 40),
                  labels: list[str] | None = None, copies: dict[int, int] | None = None,
                  prefix: str = "k") -> list[str]:
    """A dataset of ``n`` real JPEG samples in shards of ``shard_size``; returns keys in order.

    ``copies`` maps a sample index to the index whose picture it re-encodes
    (JPEG quality 60 instead of 90): planted near-duplicates.
    """
    num_shards = -(-n // shard_size)
    manifest_mod.save(root, manifest_mod.new("shard", {"test": True, "n": n}, parent=None, num_shards=num_shards))
    keys = [f"{prefix}{i:06d}" for i in range(n)]
    copies = copies or {}
    for s in range(num_shards):
        w = ShardWriter(root, s)
        for i in range(s * shard_size, min(n, (s + 1) * shard_size)):
            img = jpeg_bytes(make_photo(copies.get(i, i), image_size, cell=16), quality=60 if i in copies else 90)
            w.add(keys[i], img, "jpg", {"source": f"test/{i}.jpg", "width": image_size[0],
                                        "height": image_size[1], "label": labels[i] if labels else None})
        manifest_mod.record_shard(root, s, w.commit())
    return keys


def write_embeddings(root: str, keys: list[str], X: np.ndarray, *, model: str = "test-vectors") -> None:
    """An ``embeddings`` sidecar (embed stage format) holding X for ``keys``."""
    ds = Dataset(root)
    idx = ds.index(columns=["key", "shard"])
    shard_of = dict(zip(idx["key"].to_pylist(), idx["shard"].to_pylist()))
    row = {k: i for i, k in enumerate(keys)}
    d = X.shape[1]
    params = {"model": model, "weights_sha256": "0" * 64, "weights_source": "test", "image_size": 0,
              "dtype": "float32"}
    manifest_mod.record_stage(root, "embeddings", params, model=model, dim=d, weights_sha256="0" * 64)
    for s in ds.completed_shards():
        ks = [k for k in keys if shard_of[k] == s]
        mat = X[[row[k] for k in ks]].astype(np.float32) if ks else np.zeros((0, d), np.float32)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1), pa.float32()), d)
        table = pa.table({"key": pa.array(ks, pa.string()), "embedding": emb,
                          "status": pa.array(["ok"] * len(ks), pa.string()),
                          "error": pa.array([None] * len(ks), pa.string())})
        ds.write_sidecar("embeddings", s, table)
        manifest_mod.record_shard(root, s, {"counts": {"total": len(ks), "ok": len(ks)}}, stage="embeddings")
    manifest_mod.record_stage(root, "embeddings", params, finished=manifest_mod.now_iso())


def write_flag_sidecar(root: str, stage: str, column: str, keep: dict[str, bool], extra: dict[str, dict] | None = None) -> None:
    """A minimal dedup (``keep``) or retrieve (``selected``) sidecar for the given keys."""
    ds = Dataset(root)
    idx = ds.index(columns=["key", "shard"])
    manifest_mod.record_stage(root, stage, {"test": True})
    for s in ds.completed_shards():
        ks = [k for k, sh in zip(idx["key"].to_pylist(), idx["shard"].to_pylist()) if sh == s]
        cols = {"key": ks, column: [bool(keep.get(k, True)) for k in ks]}
        names = sorted({n for k in ks for n in (extra or {}).get(k, {})})
        for name in names:
            cols[name] = [(extra or {}).get(k, {}).get(name) for k in ks]
        ds.write_sidecar(stage, s, pa.table(cols))
        manifest_mod.record_shard(root, s, {"counts": {"total": len(ks)}}, stage=stage)
    manifest_mod.record_stage(root, stage, {"test": True}, finished=manifest_mod.now_iso())


def build_curated(root: str, seed_root: str, *, n: int = 60, shard_size: int = 30) -> dict:
    """A pool dataset that went through every selection stage, and its seed dataset.

    Pool: ``n`` real JPEGs with 16-d embeddings from 3 blobs; dedup drops
    keys[1::10] as copies of keys[0::10]; retrieval selected keys[:20] (seed
    keys s000000..s000003 of ``seed_root``); clustered on 6,2; sampled 25.
    Returns what the tests need to check against.
    """
    from webcurate.curation.cluster import run_cluster
    from webcurate.curation.sample import run_sample

    keys = write_dataset(root, n, shard_size=shard_size)
    X, _ = mixture(16, [n // 2, n // 3, n - n // 2 - n // 3], seed=2)
    write_embeddings(root, keys, X)
    seed_keys = write_dataset(seed_root, 4, shard_size=4, prefix="s")
    dropped = {keys[i]: keys[i - 1] for i in range(1, n, 10)}
    extra = {k: {"duplicate_of": d, "similarity": 0.95, "reason": "copy"} for k, d in dropped.items()}
    write_flag_sidecar(root, "dedup", "keep", {k: k not in dropped for k in keys}, extra)
    retrieved = [k for k in keys[:20] if k not in dropped]
    rextra = {k: {"score": 0.9 - 0.01 * i, "seed_key": seed_keys[i % 4], "seed_dataset": seed_root, "mode": "sample"}
              for i, k in enumerate(retrieved)}
    write_flag_sidecar(root, "retrieve", "selected", {k: k in retrieved for k in keys}, rextra)
    run_cluster(root, levels="6,2", resampling_steps=2, seed=0, subset="dedup", summary=False)
    run_sample(root, 25, seed=0, summary=False)
    t = Dataset(root).read_sidecar("sample")
    sampled = [k for k, s in zip(t["key"].to_pylist(), t["selected"].to_pylist()) if s]
    return {"keys": keys, "dropped": dropped, "retrieved": retrieved, "sampled": sampled, "seed_keys": seed_keys}
