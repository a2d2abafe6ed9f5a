"""The distributed copy-dedup's cost model, calibrated on measured runs (used by bench/curation_scale.py).

Every step's CPU seconds (as sampled per Ray step) are divided by the work
the step does, in the units of its algorithm, and the per-unit cost is
carried to another N (1 B on paper):

- ``ivf knn``: each query scans ``nprobe`` cells of N/nlist vectors -> N^2 / nlist;
- ``assign cells``: N x nlist (each vector against every centroid, BLAS);
- ``train cells``: nlist^2 (20 training points a cell x nlist centroids x 10 iterations);
- ``split by cell``: N x waves (every wave reads and splits every part);
- everything else (index/exact pass, sample, lookup, gather, write, the
  driver's merge, Ray's own processes): N.

Each step's CPU-s = fixed + per-unit x units, a least-squares line over the
measured sizes (through the origin when only one size was measured).

nlist follows the product: min(65536, 4 sqrt N) (``curation.knn.choose_index``).
Waves follow ``curation.ray_tasks.waves``: 3 x N x D x 2 bytes over 30 % of
the cluster's object store. Per-core speed is this machine's.
"""
from __future__ import annotations

import json
import math

LINEAR = "linear (index, exact, sample, lookup, gather, write, Ray)"
GIB = float(1 << 30)


def nlist_of(n: float) -> int:
    return int(max(16, min(65536, 4 * int(math.sqrt(n)))))


def units(step: str, n: float, nlist: float, waves: float) -> float:
    return {"ivf knn": n * n / nlist, "assign cells": n * nlist, "train cells": nlist * nlist,
            "split by cell": n * waves}.get(step, n)


def group(cpu_by_step: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for step, cpu in cpu_by_step.items():
        key = step if step in ("ivf knn", "assign cells", "train cells", "split by cell", "driver") else LINEAR
        out[key] = out.get(key, 0.0) + cpu
    return out


def load_runs(path: str) -> list[dict]:
    runs = [json.loads(ln) for ln in open(path) if ln.strip()]
    return [r for r in runs if "error" not in r]


def calibrate(runs: list[dict]) -> dict[str, tuple[float, float]]:
    """Per step (fixed CPU-s, CPU-s per unit): a line through all runs, or through the origin for one run."""
    steps = set().union(*(group(r["cpu_by_step"]) for r in runs))
    out = {}
    for s in steps:
        xs = [units(s, r["n"], r["info"]["nlist"], r["info"]["waves"]) for r in runs]
        ys = [group(r["cpu_by_step"]).get(s, 0.0) for r in runs]
        a, b = fit_line(xs, ys) if len(runs) > 1 else (0.0, ys[0] / xs[0])
        out[s] = (a, b) if a >= 0 and b > 0 else (0.0, sum(ys) / sum(xs))  # no negative fixed cost
    return out


def predict(cost: dict[str, tuple[float, float]], n: float, nlist: float, waves: float) -> dict[str, float]:
    return {s: a + b * units(s, n, nlist, waves) for s, (a, b) in cost.items()}


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def project(path: str, n: float = 1e9, dim: int = 384, cores: int = 2048, store_gib: float = 64 * 77,
            task_gib: float = 2.0, gpus: int = 64, gpu_tb_s: float = 3.35, gpu_tflops: float = 60.0) -> list[str]:
    """Markdown: the measured runs checked against the model, then the model at ``n``."""
    runs = sorted((r for r in load_runs(path) if r["path"] == "new"), key=lambda r: r["n"])
    if not runs:
        return ["no runs of the new path in " + path]
    ref = runs[-1]
    cost = calibrate(runs)
    sizes = ", ".join(f"{r['n']:,}" for r in runs)
    out = [f"Per step a fixed cost + a cost per unit of work, fitted on N = {sizes} (CPU-s, measured / model):",
           "", "| N | " + " | ".join(sorted(cost)) + " |", "|---|" + "---|" * len(cost)]
    for r in runs:
        got = group(r["cpu_by_step"])
        pred = predict(cost, r["n"], r["info"]["nlist"], r["info"]["waves"])
        out.append(f"| {r['n']:,} | " + " | ".join(f"{got.get(s, 0):.0f} / {pred[s]:.0f}" for s in sorted(cost))
                   + " |")
    nl = nlist_of(n)
    waves = max(1, math.ceil(3 * n * dim * 2 / (0.3 * store_gib * GIB)))
    pred = predict(cost, n, nl, waves)
    budget_rows = task_gib * GIB // (3 * 4 * dim)
    groups = math.ceil(3 * n / budget_rows)
    parts = math.ceil(n / 10_000)
    serial = pred.get("train cells", 0.0) + pred.get("driver", 0.0)  # one task (1 thread) and the driver
    parallel = sum(v for s, v in pred.items() if s not in ("train cells", "driver"))
    xs = [float(r["n"]) for r in runs]
    a, b = fit_line(xs, [float(r["driver_peak"]) for r in runs]) if len(runs) > 1 else (ref["driver_peak"], 0.0)
    # faiss-gpu: the scan is bandwidth-bound (every probed cell read once per query, float32),
    # assign/train are GEMMs; both at half the GPU's peak. Assumptions, not measurements.
    scan_s = n * 10 * (n / nl) * dim * 4 / (0.5 * gpu_tb_s * 1e12)
    gemm_assign = 2 * n * nl * dim / (0.5 * gpu_tflops * 1e12)
    gemm_train = 2 * 20 * nl * nl * dim * 10 / (0.5 * gpu_tflops * 1e12)
    h = 3600.0
    out += ["", f"At N = {n:,.0f} x {dim} (nlist {nl:,}, nprobe 10, {waves} wave(s), --memory-per-task "
            f"{task_gib:g}GiB):", "",
            "| step | CPU-hours (this machine's cores) | tasks | wall on the cluster |", "|---|---|---|---|"]
    tasks = {"ivf knn": groups, "assign cells": parts, "split by cell": parts * waves, "train cells": 1,
             "driver": 1, LINEAR: f"~{6 * parts:,} (6 per part)"}
    for s in sorted(pred, key=lambda s: -pred[s]):
        wall = pred[s] / h if s in ("train cells", "driver") else pred[s] / cores / h
        t = tasks.get(s, "")
        out.append(f"| {s} | {pred[s] / h:,.1f} | {t:,} | {wall:.2f} h |" if isinstance(t, int)
                   else f"| {s} | {pred[s] / h:,.1f} | {t} | {wall:.2f} h |")
    out += [f"| **total** | **{(serial + parallel) / h:,.0f}** | | **{serial / h + parallel / cores / h:.1f} h** "
            f"on {cores:,} cores (serial: train cells + driver {serial / h:.1f} h) |", "",
            f"- search tasks: {groups:,} cell groups of <= {budget_rows:,.0f} rows x {dim} x 4 B x 3 = "
            f"{task_gib:g} GiB each; {parts:,} parts of 10,000 rows ({10_000 * dim * 2 / 2**20:.1f} MiB float16)",
            f"- driver peak, fitted on the measured sizes: {a / GIB:.2f} GiB + {b * 1e6 / GIB * 1024:.1f} MiB per "
            f"million rows -> {(a + b * 4e6) / GIB:.2f} GiB at 4M, {(a + b * n) / GIB:,.0f} GiB at {n:,.0f}",
            f"- faiss-gpu (assumed {gpus} GPUs at {gpu_tb_s} TB/s, {gpu_tflops:g} TFLOP/s fp32, half of peak): "
            f"kNN scan {scan_s / h:,.0f} GPU-h -> {scan_s / gpus / h:.2f} h; assign {gemm_assign / h:.1f} GPU-h; "
            f"train cells {gemm_train / 60:.1f} min on one GPU (vs {pred.get('train cells', 0) / h:.1f} h on "
            f"one core)"]
    return out
