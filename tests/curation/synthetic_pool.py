"""Index-only synthetic datasets with an ``embeddings`` sidecar, for the global stages at size.

The global stages (dedup, cluster, sample, retrieve) read the index and the
sidecars, never the tars, so a dataset of N vectors needs no images: this
writes index parts (key, status ok, sha256, width, height, bytes) and
float16 embedding parts through the real writers and completion records.
Loaded by path (tests are not a package): ``load_helper(.../synthetic_pool.py)``.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from webcurate.shards import layout, manifest as manifest_mod
from webcurate.shards.writer import write_parquet


def planted_vectors(n: int, d: int, pairs: int, *, seed: int = 0, concepts: int = 50,
                    lo: float = 0.7, hi: float = 0.98) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, d) float32 normalised around ``concepts`` centres; the last ``pairs`` rows copy earlier ones at
    cosine uniform in [lo, hi]. Returns x, original ids, copy ids."""
    rng = np.random.default_rng(seed)
    base = n - pairs
    centres = rng.standard_normal((concepts, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, d), dtype=np.float32)
    x[:base] = centres[rng.integers(0, concepts, base)] / np.sqrt(3) + rng.standard_normal((base, d)) / np.sqrt(d)
    x[:base] /= np.linalg.norm(x[:base], axis=1, keepdims=True)
    orig = rng.choice(base, pairs, replace=False)
    target = rng.uniform(lo, hi, pairs).astype(np.float32)
    noise = rng.standard_normal((pairs, d)).astype(np.float32)
    noise -= (noise * x[orig]).sum(1, keepdims=True) * x[orig]
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    x[base:] = target[:, None] * x[orig] + np.sqrt(1 - target ** 2)[:, None] * noise
    return x, orig, np.arange(base, n)


def write_pool(root: str, x: np.ndarray, shard_size: int, *, prefix: str = "v") -> list[str]:
    """An index-only dataset holding ``x`` as float16 embeddings in shards of ``shard_size``; returns keys."""
    n, d = x.shape
    shards = -(-n // shard_size)
    manifest_mod.save(root, manifest_mod.new("synthetic", {"n": n, "d": d}, None, shards))
    keys = [f"{prefix}{i:08d}" for i in range(n)]
    manifest_mod.record_stage(root, "embeddings", {"model": "synthetic", "weights_sha256": "0" * 64},
                              model="synthetic", dim=d, weights_sha256="0" * 64, image_size=0)
    for s in range(shards):
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        ks = keys[lo:hi]
        write_parquet(layout.index_uri(root, s), pa.table({
            "key": ks, "shard": pa.array([s] * len(ks), pa.int32()), "status": ["ok"] * len(ks),
            "sha256": [hashlib.sha256(k.encode()).hexdigest() for k in ks],
            "width": pa.array(np.full(len(ks), 64), pa.int32()), "height": pa.array(np.full(len(ks), 48), pa.int32()),
            "bytes": pa.array(np.arange(len(ks)) % 97 + 1000, pa.int64())}))
        manifest_mod.record_shard(root, s, {"counts": {"total": len(ks), "ok": len(ks)}})
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x[lo:hi].astype(np.float16).reshape(-1), pa.float16()), d)
        write_parquet(layout.sidecar_uri(root, "embeddings", s), pa.table({
            "key": ks, "embedding": emb, "status": ["ok"] * len(ks), "error": pa.array([None] * len(ks), pa.string())}))
        manifest_mod.record_shard(root, s, {"counts": {"total": len(ks), "ok": len(ks)}}, stage="embeddings")
    manifest_mod.record_stage(root, "embeddings", {"model": "synthetic", "weights_sha256": "0" * 64},
                              finished=manifest_mod.now_iso())
    return keys


def stored(x: np.ndarray) -> np.ndarray:
    """``x`` as the stages read it back: float16 storage, re-normalised in float32."""
    from webcurate.curation.embedding_parts import normalized

    return normalized(x.astype(np.float16))
