"""Copy-dedup of 1M x 384 normalised vectors with planted near-duplicate pairs.

Side by side in one run:

- ours: ``webcurate.curation.dedup.run_dedup(method="copy")`` end to end on a
  dataset whose ``embeddings`` sidecar holds the vectors (read parts, exact
  pass, IVF kNN graph k=64, cosine > 0.6, union-find, write the ``dedup``
  sidecar);
- peer: faiss exact search (``IndexFlatIP``, the same k) timed on a sample of
  queries and extrapolated to all N (running it in full would take hours on
  2 cores) — it is also the ground truth for recall.

Data: N vectors drawn around 2000 random "concept" centres (cosine to other
members of the same concept ~0.25, so IVF sees realistic structure, and no
accidental pair crosses 0.6), plus planted copies of random base vectors at
cosine uniform in [0.65, 0.98].

Reports wall time, planted-pair recall/precision (a pair counts when both
ends end in one component), and recall of the exact kNN graph's edges over
the threshold on a sample of queries.

    .venv/bin/python bench/dedup_1m.py            # 1M, ~minutes
    .venv/bin/python bench/dedup_1m.py --quick    # 100k
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

# OpenMP threads (faiss) spin while idle by default, which starves everything else on a
# small shared machine; the CLI sets the same. Must be set before faiss loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def make_vectors(n: int, d: int, pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D) float32 normalised: N - pairs base vectors + pairs copies; returns x, orig ids, copy ids."""
    rng = np.random.default_rng(seed)
    base_n = n - pairs
    centres = rng.standard_normal((2000, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, d), dtype=np.float32)
    step = 100_000
    for s in range(0, base_n, step):
        e = min(base_n, s + step)
        noise = rng.standard_normal((e - s, d), dtype=np.float32) / np.sqrt(d)
        # |c| = 1 and |noise| ~ 1: a^2 / (a^2 + 1) = 0.25 -> a = 1/sqrt(3)
        x[s:e] = centres[rng.integers(0, len(centres), e - s)] / np.sqrt(3) + noise
    x[:base_n] /= np.linalg.norm(x[:base_n], axis=1, keepdims=True)
    orig = rng.choice(base_n, pairs, replace=False)
    target = rng.uniform(0.65, 0.98, pairs).astype(np.float32)
    noise = rng.standard_normal((pairs, d), dtype=np.float32)
    noise -= (noise * x[orig]).sum(1, keepdims=True) * x[orig]  # orthogonal to the original
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    x[base_n:] = target[:, None] * x[orig] + np.sqrt(1 - target ** 2)[:, None] * noise
    x[base_n:] /= np.linalg.norm(x[base_n:], axis=1, keepdims=True)
    return x, orig.astype(np.int64), np.arange(base_n, n, dtype=np.int64)


def write_dataset(root: str, x: np.ndarray, shard_size: int) -> list[str]:
    """A dataset holding only index + embeddings sidecar (dedup never opens the tars)."""
    import pyarrow as pa

    from webcurate.shards import layout, manifest as manifest_mod
    from webcurate.shards.schema import rows_to_table
    from webcurate.shards.writer import write_parquet

    n, d = x.shape
    shards = -(-n // shard_size)
    keys = [f"{i:012x}" for i in range(n)]
    manifest_mod.save(root, manifest_mod.new("bench", {"n": n}, parent=None, num_shards=shards))
    params = {"model": "synthetic", "weights_sha256": "0" * 64, "weights_source": "bench", "image_size": 0,
              "dtype": "float16"}
    manifest_mod.record_stage(root, "embeddings", params, model="synthetic", dim=d, weights_sha256="0" * 64)
    m = manifest_mod.load(root)
    rng = np.random.default_rng(1)
    for s in range(shards):
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        rows = [{"key": keys[i], "shard": s, "source": f"bench/{i}", "status": "ok",
                 "width": int(w), "height": 256, "bytes": 10_000, "sha256": f"{i:064x}"}
                for i, w in zip(range(lo, hi), rng.integers(200, 400, hi - lo))]
        write_parquet(layout.index_uri(root, s), rows_to_table(rows))
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x[lo:hi].astype(np.float16).reshape(-1)), d)
        table = pa.table({"key": pa.array(keys[lo:hi]), "embedding": emb,
                          "status": pa.array(["ok"] * (hi - lo)), "error": pa.array([None] * (hi - lo), pa.string())})
        write_parquet(layout.sidecar_uri(root, "embeddings", s), table)
        m["completed_shards"].append(s)
        m["stages"]["embeddings"].setdefault("completed_shards", []).append(s)
    manifest_mod.save(root, m)
    return keys


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors in all")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--pairs", type=int, default=None, help="planted copies (default N/20)")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=0.6)
    ap.add_argument("--sample", type=int, default=5000, help="queries for the exact-search comparison")
    ap.add_argument("--quick", action="store_true", help="100k vectors")
    ap.add_argument("--workdir", default=None, help="where the synthetic dataset goes (default: a temp dir)")
    args = ap.parse_args()
    if args.quick:
        args.n = 100_000
    pairs = args.pairs or args.n // 20
    os.environ.setdefault("WEBCURATE_QUIET", "1")

    import faiss

    from webcurate.curation.dedup import run_dedup
    from webcurate.shards.dataset import Dataset

    print(f"# dedup_1m: N={args.n:,} D={args.dim} planted pairs={pairs:,} k={args.k} threshold={args.threshold} "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    t = time.time()
    x, orig, copy = make_vectors(args.n, args.dim, pairs)
    print(f"generate: {time.time() - t:.1f}s")
    work = args.workdir or tempfile.mkdtemp(prefix="webcurate-dedup1m-")
    root = os.path.join(work, "ds")
    shutil.rmtree(root, ignore_errors=True)
    t = time.time()
    keys = write_dataset(root, x, shard_size=10_000)
    print(f"write dataset (index + float16 embeddings sidecar): {time.time() - t:.1f}s")

    # -- ours ---------------------------------------------------------------
    t, c = time.time(), cpu_seconds()
    res = run_dedup(root, method="copy", k=args.k, threshold=args.threshold, summary=False)
    ours_s, ours_cpu = time.time() - t, cpu_seconds() - c
    print(f"ours: run_dedup copy end to end {ours_s:.1f}s wall, {ours_cpu:.1f}s CPU  phases {res['timings']}  index={res['index']} "
          f"edges={res['edges']:,} removed={res['counts']['removed']:,} peak RSS {peak_rss_gib():.2f} GiB")
    table = Dataset(root).read_sidecar("dedup", columns=["key", "keep", "duplicate_of"])
    pos = {k: i for i, k in enumerate(keys)}
    kept = np.asarray(table["keep"].to_numpy(zero_copy_only=False))
    row_of = np.array([pos[k] for k in table["key"].to_pylist()])
    keeper = np.empty(args.n, dtype=np.int64)
    dup = table["duplicate_of"].to_pylist()
    keeper[row_of] = [r if kp else pos[d] for r, kp, d in zip(row_of, kept, dup)]
    removed = ~np.ones(args.n, bool)
    removed[row_of[~kept]] = True

    # Planted pairs: recovered when both ends share a keeper.
    same = keeper[orig] == keeper[copy]
    planted_recall = same.mean()
    pair_sim = np.einsum("ij,ij->i", x[orig], x[copy])
    buckets = [(0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01)]
    by_bucket = ", ".join(f"[{lo:.1f},{min(hi, 1):.1f}): {same[(pair_sim >= lo) & (pair_sim < hi)].mean():.3f}"
                          for lo, hi in buckets if ((pair_sim >= lo) & (pair_sim < hi)).any())
    planted_members = np.zeros(args.n, bool)
    planted_members[orig] = planted_members[copy] = True
    planted_precision = planted_members[removed].mean() if removed.any() else 1.0

    # -- peer: exact flat search on a sample, extrapolated -------------------
    # The vectors as dedup saw them (float16 round trip).
    xf = x.astype(np.float16).astype(np.float32)
    xf /= np.linalg.norm(xf, axis=1, keepdims=True)
    rng = np.random.default_rng(2)
    # Half the sample from planted pairs (where the edges are), half uniform.
    q = np.unique(np.concatenate([rng.choice(copy, args.sample // 2, replace=False),
                                  rng.choice(args.n, args.sample // 2, replace=False)]))
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(xf)
    t, c = time.time(), cpu_seconds()
    s, i = flat.search(xf[q], args.k + 1)
    flat_s, flat_cpu = time.time() - t, cpu_seconds() - c
    flat_extrapolated = flat_s * args.n / len(q)
    flat_cpu_extrapolated = flat_cpu * args.n / len(q)
    a = np.repeat(q, args.k + 1)
    b = i.reshape(-1)
    ok = (s.reshape(-1) > args.threshold) & (b != a)
    a, b = a[ok], b[ok]
    edge_recall = float((keeper[a] == keeper[b]).mean()) if len(a) else 1.0
    # Precision: every sampled removal is backed by an exact neighbour above the threshold.
    backed = np.zeros(args.n, bool)
    backed[a] = True
    backed[b] = True
    q_removed = q[removed[q]]
    precision_sample = float(backed[q_removed].mean()) if len(q_removed) else 1.0
    print(f"peer: faiss IndexFlatIP exact search {len(q):,} queries in {flat_s:.1f}s wall, {flat_cpu:.1f}s CPU -> "
          f"{flat_extrapolated:.0f}s wall extrapolated to {args.n:,} queries (search only)")
    print()
    print("| metric | value |")
    print("|---|---|")
    print(f"| N x D | {args.n:,} x {args.dim} |")
    print(f"| ours: copy dedup wall time (read, IVF kNN k={args.k}, union-find, write) | {ours_s:.1f} s "
          f"({ours_cpu:.0f} CPU-s) |")
    print(f"| ours: phases | {res['timings']} |")
    print(f"| peer: exact flat kNN, extrapolated (search only) | {flat_extrapolated:.0f} s "
          f"({flat_cpu_extrapolated:.0f} CPU-s) |")
    print(f"| time ratio peer / ours (wall; CPU) | {flat_extrapolated / ours_s:.1f}x; "
          f"{flat_cpu_extrapolated / max(ours_cpu, 1e-9):.1f}x |")
    print(f"| load average during the run (2 cores, shared) | {os.getloadavg()[0]:.1f} |")
    print(f"| planted pairs recovered (recall) | {planted_recall:.4f} ({int(same.sum()):,}/{pairs:,}) |")
    print(f"| planted-pair recall by pair cosine | {by_bucket} |")
    print(f"| removed samples that are planted copies/originals (precision) | {planted_precision:.4f} |")
    print(f"| exact-search edges > {args.threshold} recovered, {len(q):,} sampled queries (recall) | "
          f"{edge_recall:.4f} ({len(a):,} edges) |")
    print(f"| sampled removals backed by an exact edge (precision) | {precision_sample:.4f} |")
    print(f"| peak RSS | {peak_rss_gib():.2f} GiB |")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
