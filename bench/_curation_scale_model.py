"""Tables, targets and the 1 B cost model of bench/curation_scale.py, from its --json runs.

The cost model of the distributed copy-dedup, calibrated on measured runs:

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
Waves: since commit 59ba5c7 the split rows go to the stage's scratch folder on the
dataset's storage (``curation.scratch``), so on S3 there is one wave (runs measured
before it split by the object store's size; their ``waves`` are what they did).
Per-core speed is this machine's.
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
    latest = {(r["n"], r["path"]): r for r in runs if "error" not in r and r["path"] != "agreement"}
    return list(latest.values())


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


def project(path: str, n: float = 1e9, dim: int = 384, cores: int = 2048,
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
    for m in (4e6,):  # on this machine: 2 cores, the waves of its object store as measured at the largest N
        here = sum(predict(cost, m, nlist_of(m), math.ceil(ref["info"]["waves"] * m / ref["n"])).values())
        out += ["", f"This machine at N = {m:,.0f}: {here:,.0f} CPU-s predicted, about {here / 2 / 60:.0f} min on "
                    "its 2 cores (why 4M did not fit the 13-minute slot)."]
    nl = nlist_of(n)
    waves = 1  # scratch on S3 (curation.scratch.waves)
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
    blocks = max(4 * cores, math.ceil(n / (budget_rows // 2)))  # dedup_graph.producer_blocks
    scratch_tb = 3 * n * (2 * dim + 8 * 10 + 10) / 1e12
    tasks = {"ivf knn": groups, "assign cells": blocks, "split by cell": blocks * waves, "train cells": 1,
             "driver": 1, LINEAR: f"~{6 * parts:,} (6 per part)"}
    for s in sorted(pred, key=lambda s: -pred[s]):
        wall = pred[s] / h if s in ("train cells", "driver") else pred[s] / cores / h
        t = tasks.get(s, "")
        out.append(f"| {s} | {pred[s] / h:,.1f} | {t:,} | {wall:.2f} h |" if isinstance(t, int)
                   else f"| {s} | {pred[s] / h:,.1f} | {t} | {wall:.2f} h |")
    out += [f"| **total** | **{(serial + parallel) / h:,.0f}** | | **{serial / h + parallel / cores / h:.1f} h** "
            f"on {cores:,} cores (serial: train cells + driver {serial / h:.1f} h) |", "",
            f"- search tasks: {groups:,} cell groups of <= {budget_rows:,.0f} rows x {dim} x 4 B x 3 = "
            f"{task_gib:g} GiB each; {parts:,} parts of 10,000 rows ({10_000 * dim * 2 / 2**20:.1f} MiB float16) read "
            f"as {blocks:,} producer blocks; scratch on S3 {scratch_tb:.1f} TB written once ({blocks:,} split files, "
            f"{blocks * groups:,.0f} ranged reads by the search tasks)",
            f"- driver peak, fitted on the measured sizes: {a / GIB:.2f} GiB + {b * 1e6 / GIB * 1024:.1f} MiB per "
            f"million rows -> {(a + b * 4e6) / GIB:.2f} GiB at 4M, {(a + b * n) / GIB:,.0f} GiB at {n:,.0f}",
            f"- faiss-gpu (assumed {gpus} GPUs at {gpu_tb_s} TB/s, {gpu_tflops:g} TFLOP/s fp32, half of peak): "
            f"kNN scan {scan_s / h:,.0f} GPU-h -> {scan_s / gpus / h:.2f} h; assign {gemm_assign / h:.1f} GPU-h; "
            f"train cells {gemm_train / 60:.1f} min on one GPU (vs {pred.get('train cells', 0) / h:.1f} h on "
            f"one core)"]
    info = ref["info"]
    if info.get("groups") and info.get("largest_task_bytes"):
        db = ref["n"] / info["groups"]
        rows = info["largest_task_bytes"] / (4 * dim) - db  # held = all its rows + its database, float32
        out.append(f"- measured at N = {ref['n']:,}: {info['groups']} groups of ~{nlist_of(ref['n']) / info['groups']:.0f}"
                   f" cells; the largest group held {rows:,.0f} rows for ~{db:,.0f} database rows "
                   f"({rows / db:.1f}x; knn_graph budgets 3x). At {n:,.0f} a {task_gib:g} GiB group holds "
                   f"~{budget_rows / 3 / (n / nl):.0f} cells of {n / nl:,.0f} rows (nprobe = 10: a query's cells can lie in "
                   "up to 10 groups)")
    return out


# -- tables and targets --------------------------------------------------------------------------------------------

fmt_gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731


def table(n: int, runs: dict[str, dict]) -> list[str]:
    cols = [p for p in ("old", "new") if p in runs]
    out = [f"| N = {n:,} x {runs[cols[0]].get('dim', 384)} | " + " | ".join(cols) +
           (" | new / old |" if len(cols) == 2 else " |"),
           "|---|" + "---|" * (len(cols) + (len(cols) == 2))]

    def row(name: str, key, fmt, ratio: bool = True) -> None:
        vals = [runs[c].get(key) if isinstance(key, str) else key(runs[c]) for c in cols]
        cells = [fmt(v) if v is not None else "-" for v in vals]
        r = ""
        if len(cols) == 2:
            r = f" {vals[1] / vals[0]:.2f}x |" if ratio and vals[0] and vals[1] is not None else " |"
        out.append(f"| {name} | " + " | ".join(cells) + " |" + r)

    if any("error" in runs[c] for c in cols):
        out.append("| error | " + " | ".join(runs[c].get("error", "") for c in cols) + " |")
        cols = [c for c in cols if "error" not in runs[c]]
        if not cols:
            return out
    row("dedup wall (run_dedup call)", "wall", lambda v: f"{v:.1f} s")
    row("CPU-s of the process tree (sampled)", "cpu", lambda v: f"{v:.0f}")
    row("planted-pair recall", "recall", lambda v: f"{v:.4f}", False)
    row("recall, pairs at cosine < 0.8", "recall_lo", lambda v: f"{v:.4f}", False)
    row("precision (removed are planted)", "precision", lambda v: f"{v:.4f}", False)
    row("removed", "removed", lambda v: f"{v:,}")
    row("driver peak RSS", "driver_peak", fmt_gib)
    row("largest task peak RSS (VmHWM)", lambda r: r.get("task_peak") or None, fmt_gib, False)
    row("largest task private (RssAnon)", lambda r: r.get("task_anon") or None, fmt_gib, False)
    row("whole tree peak (private + object store)", "tree_peak", fmt_gib)
    row("load average before / after", lambda r: f"{r['load_before']:.1f} / {r['load_after']:.1f}",
        str, False)
    if "agreement" in runs.get("new", {}):
        out.append(f"| rows whose kept sample is the same in both | | | {runs['new']['agreement']:.5f} |")
    return out


def report(path: str, dim: int) -> list[str]:
    """Markdown from a --json file: the side-by-side table per N, the targets, the 1 B model."""
    by_n: dict[int, dict[str, dict]] = {}
    for ln in open(path):
        r = json.loads(ln)
        by_n.setdefault(r["n"], {})[r["path"]] = r  # the latest run of each (N, path)
    out = []
    for n, runs in sorted(by_n.items()):
        if "agreement" in runs and "new" in runs:
            runs["new"]["agreement"] = runs.pop("agreement")["agreement"]
        runs.pop("agreement", None)
        out += table(n, runs) + [""]
    ok = {n: r for n, r in by_n.items() if "error" not in r.get("new", {"error": 1})}
    both = {n: r for n, r in ok.items() if "error" not in r.get("old", {"error": 1})}
    if 1_000_000 in both:
        o, w = both[1_000_000]["old"], both[1_000_000]["new"]
        out.append(f"- time at 1M: new / old = {w['wall'] / o['wall']:.2f}x (target <= 1.2x): "
                   f"{'met' if w['wall'] <= 1.2 * o['wall'] else 'missed'}")
        out.append(f"- recall at 1M: new {w['recall']:.4f} vs old {o['recall']:.4f} (target: the same): "
                   f"{'met' if w['recall'] >= o['recall'] - 0.001 else 'missed'}")
    if 4_000_000 in ok:
        d = ok[4_000_000]["new"]["driver_peak"]
        out.append(f"- driver peak at 4M (measured): {d / GIB:.2f} GiB (target <= 1 GiB): "
                   f"{'met' if d <= GIB else 'missed'}")
    elif len(ok) > 1:
        a, b = fit_line([float(n) for n in ok], [float(r["new"]["driver_peak"]) for r in ok.values()])
        out.append(f"- driver peak at 4M (NOT measured; the line through N = {', '.join(f'{n:,}' for n in ok)}): "
                   f"{(a + b * 4e6) / GIB:.2f} GiB (target <= 1 GiB)")
    return out + ["", *project(path, dim=dim)]
