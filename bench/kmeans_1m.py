"""Benchmark: hierarchical k-means of 1M x 384 (levels 10000/1000/100), ours vs plain faiss.

Both sides cluster the same synthetic pool: L2-normalised 384-d vectors drawn
around 3000 "concepts" grouped in 60 "domains", concept sizes following a
power law (a few huge, many tiny), like web data. Each side runs in its own process so its peak memory (RSS) is
its own.

- ours: ``webcurate.curation.kmeans.hierarchical_kmeans`` with the defaults
  of `webcurate cluster` (level 1 by coarse-then-split + IVF refinement at this
  size, 10 resampling steps on the upper levels, k-means++ init where cheap);
- peer: the straightforward faiss recipe: ``faiss.Kmeans`` per level with its
  defaults (niter 20, up to 256 points per centroid, so all 1M points at level
  1), exact assignment, no resampling. (The reference implementation,
  facebookresearch/ssl-data-curation, is torch/GPU code that is not packaged;
  this is what its level loop does on CPU with faiss.)

Reported per side: wall time, peak RSS (and above the data), the level-1
k-means objective (mean squared distance to the centroid), and the quality
the clustering exists for: the entropy of concept ids in a balanced sample
of 10% (higher = more even coverage of concepts; random sampling shown too).

    .venv/bin/python bench/kmeans_1m.py            # 1M x 384, 10000/1000/100 (~10-20 min on 2 cores)
    .venv/bin/python bench/kmeans_1m.py --quick    # 100k x 384, 1000/100/10 (~1 min)
    .venv/bin/python bench/kmeans_1m.py --skip-peer
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

# Both sides alike: OpenMP threads wait passively (the default spinning
# collapses when the shared machine is busy; see curation/kmeans.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "_work", "kmeans")


def make_pool(n: int, d: int, concepts: int, seed: int = 0, domains: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, d) float32 normalised vectors, their concept ids and domain ids.

    Concepts are grouped in ``domains`` (like "animals" > "dogs"): a concept
    centre is its domain centre plus an offset (cosine ~0.7 between concepts
    of one domain, ~0 across domains), and points scatter around their
    concept (cosine ~0.9). Concept sizes follow 1/rank^1.1, so the largest
    concept holds ~15% of the pool and half the concepts fewer than 0.01%.
    """
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, concepts + 1) ** 1.1
    sizes = np.maximum(1, np.floor(w / w.sum() * n)).astype(np.int64)
    sizes[0] += n - sizes.sum()
    dom_centers = rng.standard_normal((domains, d)).astype(np.float32)
    dom_centers /= np.linalg.norm(dom_centers, axis=1, keepdims=True)
    domain_of = rng.integers(0, domains, size=concepts)
    off = rng.standard_normal((concepts, d)).astype(np.float32)
    centers = dom_centers[domain_of] + 0.65 * off / np.linalg.norm(off, axis=1, keepdims=True)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    concept = rng.permutation(np.repeat(np.arange(concepts), sizes))
    X = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):  # in blocks: no second full-size temporary
        c = concept[s:s + 100_000]
        blk = centers[c] + (0.5 / np.sqrt(d)) * rng.standard_normal((len(c), d)).astype(np.float32)
        X[s:s + len(c)] = blk / np.linalg.norm(blk, axis=1, keepdims=True)
    return X, concept, domain_of[concept]


def peak_rss_mb() -> float:
    """Peak RSS since the last ``reset_peak_rss`` (VmHWM), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> None:
    """Start the peak over from the current RSS (Linux >= 4.0), so that np.load's
    transient read buffers do not hide the algorithm's own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_side(side: str, data: str, levels: list[int], seed: int) -> dict:
    """Cluster the pool in this process; returns timings, memory and labels file."""
    X = np.load(os.path.join(data, "X.npy"))  # read fully: both sides start from the array in memory
    reset_peak_rss()
    base = peak_rss_mb()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru0.ru_utime + ru0.ru_stime
    t0 = time.perf_counter()
    if side == "ours":
        from webcurate.curation.kmeans import hierarchical_kmeans

        hier = hierarchical_kmeans(X, levels, seed=seed, progress=False)
        labels = hier.labels()
        dist = hier.distance
        methods = [lv.method for lv in hier.levels]
    else:
        import faiss

        labels = np.empty((X.shape[0], len(levels)), dtype=np.int32)
        inputs = X
        cur = None
        for t, k in enumerate(levels):
            km = faiss.Kmeans(inputs.shape[1], k, niter=20, seed=seed + t, verbose=False)
            km.train(inputs)
            index = faiss.IndexFlatL2(inputs.shape[1])
            index.add(km.centroids)
            D, I = index.search(inputs, 1)
            a = I[:, 0]
            if t == 0:
                cur, dist = a, np.sqrt(np.maximum(D[:, 0], 0))
            else:
                cur = a[cur]
            labels[:, t] = cur
            inputs = np.ascontiguousarray(km.centroids)
        methods = ["faiss flat"] * len(levels)
    seconds = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru.ru_utime + ru.ru_stime - cpu0
    np.save(os.path.join(data, f"labels_{side}.npy"), labels)
    np.save(os.path.join(data, f"dist_{side}.npy"), dist)
    return {"side": side, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak_rss_mb(), "data_rss_mb": base,
            "load_1min_after": os.getloadavg()[0],
            "objective": float(np.mean(np.asarray(dist, dtype=np.float64) ** 2)), "methods": methods}


def quality(data: str, side: str, target: int, seed: int) -> dict:
    from webcurate.curation.water_fill import balanced_sample, size_entropy

    labels = np.load(os.path.join(data, f"labels_{side}.npy"))
    dist = np.load(os.path.join(data, f"dist_{side}.npy"))
    concept = np.load(os.path.join(data, "concept.npy"))
    mask = balanced_sample(labels, target, distance=dist, strategy="random", seed=seed)
    sizes = np.bincount(labels[:, 0])
    nz = sizes[sizes > 0]
    return {"balanced_entropy": size_entropy(concept[mask]), "concepts_covered": int(np.unique(concept[mask]).size),
            "level1_nonempty": int(nz.size), "level1_max": int(nz.max()), "level1_median": float(np.median(nz))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--levels", default="10000,1000,100")
    ap.add_argument("--concepts", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="100k points, levels 1000,100,10, 1000 concepts")
    ap.add_argument("--skip-peer", action="store_true", help="only ours (the peer takes most of the time)")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.n, args.levels, args.concepts = 100_000, "1000,100,10", 1000
    levels = [int(x) for x in args.levels.split(",")]
    if args.side:  # child process: one side only
        print(json.dumps(run_side(args.side, args.data, levels, args.seed)))
        return

    data = os.path.join(WORK, f"v2_n{args.n}_d{args.dim}_c{args.concepts}_s{args.seed}")
    os.makedirs(data, exist_ok=True)
    if not os.path.exists(os.path.join(data, "concept.npy")):
        t0 = time.perf_counter()
        X, concept, domain = make_pool(args.n, args.dim, args.concepts, args.seed)
        np.save(os.path.join(data, "X.npy"), X)
        np.save(os.path.join(data, "concept.npy"), concept)
        np.save(os.path.join(data, "domain.npy"), domain)
        del X
        print(f"pool: {args.n} x {args.dim}, {args.concepts} concepts, made in {time.perf_counter() - t0:.1f} s")
    results = {}
    for side in ["ours"] + ([] if args.skip_peer else ["peer"]):
        cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--data", data, "--levels", args.levels,
               "--seed", str(args.seed), "--n", str(args.n)]
        print(f"running {side} ... (load {os.getloadavg()[0]:.1f})", flush=True)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
        results[side].update(quality(data, side, args.n // 10, args.seed))
        print(json.dumps(results[side]), flush=True)  # partial results survive a later interruption
    concept = np.load(os.path.join(data, "concept.npy"))
    from webcurate.curation.water_fill import size_entropy

    rand = np.random.default_rng(args.seed).choice(args.n, args.n // 10, replace=False)
    print(f"\nhierarchical k-means, {args.n} x {args.dim}, levels {args.levels} "
          f"({os.cpu_count()} CPUs, no GPU)")
    print(f"{'':28s}" + "".join(f"{s:>16s}" for s in results))
    rows = [("wall time (s)", "seconds", "{:.1f}"), ("CPU time (s, all threads)", "cpu_seconds", "{:.1f}"),
            ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
            ("  of which data (MB)", "data_rss_mb", "{:.0f}"), ("level-1 objective", "objective", "{:.4f}"),
            ("level-1 non-empty", "level1_nonempty", "{}"), ("level-1 largest", "level1_max", "{}"),
            ("level-1 median", "level1_median", "{:.0f}"),
            ("concept entropy, 10% bal.", "balanced_entropy", "{:.3f}"),
            ("concepts covered, 10% bal.", "concepts_covered", "{}"),
            ("machine load (1 min) after", "load_1min_after", "{:.1f}")]
    for name, key, fmt in rows:
        print(f"{name:28s}" + "".join(f"{fmt.format(r[key]):>16s}" for r in results.values()))
    print(f"{'concept entropy, 10% random':28s}{size_entropy(concept[rand]):>16.3f}"
          f"   (max {np.log(args.concepts):.3f}; covered {np.unique(concept[rand]).size})")
    print(f"level-1 method (ours): {results['ours']['methods'][0]}")
    if "peer" in results:
        r = results["peer"]["seconds"] / results["ours"]["seconds"]
        rc = results["peer"]["cpu_seconds"] / results["ours"]["cpu_seconds"]
        print(f"\nspeed-up ours vs peer: {r:.1f}x wall, {rc:.1f}x CPU time; objective ratio ours/peer: "
              f"{results['ours']['objective'] / results['peer']['objective']:.3f}")


if __name__ == "__main__":
    main()
