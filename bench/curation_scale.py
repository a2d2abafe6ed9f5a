"""Copy-dedup at scale: the distributed global stage vs the single-process path it replaced (issue 14).

Side by side in one run, on the same dataset (index parts + float16
``embeddings`` parts written through the product's writers and completion
records, 10,000 rows a part):

- **new**: today's ``webcurate.curation.dedup.run_dedup(method="copy")``
  (= ``webcurate dedup --input DS --method copy --threshold 0.6
  --memory-per-task 2GiB``): exact pass by sha256 buckets, IVF cells trained
  on a sample, per-part cell assignment, cell groups searched as Ray tasks
  sized by ``--memory-per-task``, edges merged and reduced to components on
  the driver, parts written by tasks. In-process Ray (the local default).
- **old**: the single-process ``run_dedup`` the redesign replaced (commit
  ``df37792``, the code behind the 1M result in curation_dedup.md): every
  embedding in the driver, one faiss IVF index, union-find, parts written
  from the driver. Its ``curation/`` and ``shards/`` are extracted with
  ``git archive`` into the work folder and imported through ``PYTHONPATH``
  in the child process, so both paths run unmodified.

Each path runs in its own child process; a sampler reads ``/proc`` every
0.2 s for it and all its descendants (Ray's raylet, GCS, workers): peak RSS
(``VmHWM``) and private memory (``RssAnon``) per process, and CPU seconds
attributed to the Ray step running in each worker (its title
``ray::webcurate:<step>``). The driver's peak is its own ``VmHWM``, read by the child at the end
and by the sampler; not ``ru_maxrss``, which Linux carries across ``exec`` from the parent
(``Popen`` forks the benchmark, whose pool generation held the vectors: at 4M the child's
``ru_maxrss`` read 3.83 GiB before it had done anything).

Data (the model of bench/dedup_1m.py): N - P vectors around 2,000 random
concept centres (cosine ~0.25 inside a concept) plus P = N/20 planted copies
at cosine uniform in [0.65, 0.98]. Recall: planted pairs whose ends share a
kept sample; precision: removed samples that are planted members;
agreement: rows for which old and new name the same kept sample.

    .venv/bin/python bench/curation_scale.py                       # 1M, both paths
    .venv/bin/python bench/curation_scale.py --sizes 1000000,4000000 --paths old,new
    .venv/bin/python bench/curation_scale.py --quick               # 50k
    .venv/bin/python bench/curation_scale.py --project runs.jsonl  # 1 B on paper from the --json runs
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

OLD_COMMIT = "df37792"  # the parent of the curation redesign (46b0dd3)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = 10_000


# -- data ----------------------------------------------------------------------------------------------

def make_pool(n: int, d: int, pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D) float16 normalised vectors, generated in blocks; returns x, original ids, copy ids."""
    rng = np.random.default_rng(seed)
    base_n = n - pairs
    centres = rng.standard_normal((2000, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, d), dtype=np.float16)
    for s in range(0, base_n, 100_000):
        e = min(base_n, s + 100_000)
        # |c| = 1 and |noise| ~ 1: a^2 / (a^2 + 1) = 0.25 -> a = 1/sqrt(3)
        v = centres[rng.integers(0, len(centres), e - s)] / np.sqrt(3)
        v += rng.standard_normal((e - s, d), dtype=np.float32) / np.sqrt(d)
        x[s:e] = v / np.linalg.norm(v, axis=1, keepdims=True)
    orig = np.sort(rng.choice(base_n, pairs, replace=False))
    for s in range(0, pairs, 100_000):
        o = x[orig[s:s + 100_000]].astype(np.float32)
        o /= np.linalg.norm(o, axis=1, keepdims=True)
        t = rng.uniform(0.65, 0.98, len(o)).astype(np.float32)
        noise = rng.standard_normal(o.shape, dtype=np.float32)
        noise -= (noise * o).sum(1, keepdims=True) * o  # orthogonal to the original
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        c = t[:, None] * o + np.sqrt(1 - t ** 2)[:, None] * noise
        x[base_n + s:base_n + s + len(o)] = c / np.linalg.norm(c, axis=1, keepdims=True)
    return x, orig.astype(np.int64), np.arange(base_n, n, dtype=np.int64)


def write_pool(root: str, x: np.ndarray, seed: int = 1) -> None:
    """An index-only dataset whose ``embeddings`` sidecar holds ``x`` (dedup never opens the tars)."""
    import hashlib

    import pyarrow as pa

    from webcurate.shards import layout, manifest as manifest_mod
    from webcurate.shards.writer import write_parquet

    n, d = x.shape
    shards = -(-n // SHARD)
    manifest_mod.save(root, manifest_mod.new("bench", {"n": n, "d": d}, None, shards))
    params = {"model": "synthetic", "weights_sha256": "0" * 64, "dtype": "float16"}
    manifest_mod.record_stage(root, "embeddings", params, model="synthetic", dim=d, weights_sha256="0" * 64,
                              image_size=0)
    rng = np.random.default_rng(seed)
    for s in range(shards):
        lo, hi = s * SHARD, min(n, (s + 1) * SHARD)
        keys = [f"p{i:09d}" for i in range(lo, hi)]
        m = hi - lo
        write_parquet(layout.index_uri(root, s), pa.table({
            "key": keys, "shard": pa.array(np.full(m, s), pa.int32()), "source": [f"bench/{k}" for k in keys],
            "status": ["ok"] * m, "sha256": [hashlib.sha256(k.encode()).hexdigest() for k in keys],
            "width": pa.array(rng.integers(200, 400, m), pa.int32()), "height": pa.array(np.full(m, 256), pa.int32()),
            "bytes": pa.array(np.full(m, 10_000), pa.int64())}))
        manifest_mod.record_shard(root, s, {"counts": {"total": m, "ok": m}})
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x[lo:hi].reshape(-1), pa.float16()), d)
        write_parquet(layout.sidecar_uri(root, "embeddings", s), pa.table({
            "key": keys, "embedding": emb, "status": ["ok"] * m, "error": pa.array([None] * m, pa.string())}))
        manifest_mod.record_shard(root, s, {"counts": {"total": m, "ok": m}}, stage="embeddings")
    manifest_mod.record_stage(root, "embeddings", params, finished=manifest_mod.now_iso())


def pool_dataset(work: str, n: int, d: int, pairs: int) -> tuple[str, dict, float]:
    """The dataset for (n, d, pairs), made once and reused: (root, planted pairs, seconds spent making it)."""
    root = os.path.join(work, f"pool_{n}_{d}_{pairs}")
    meta = os.path.join(root, "_bench_pairs.npz")
    if os.path.exists(meta):
        return root, dict(np.load(meta)), 0.0
    t = time.time()
    shutil.rmtree(root, ignore_errors=True)
    x, orig, copy = make_pool(n, d, pairs)
    a, b = x[orig].astype(np.float32), x[copy].astype(np.float32)
    sim = np.einsum("ij,ij->i", a, b) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    del a, b
    write_pool(root, x)
    del x
    shutil.copy(os.path.join(root, "_manifest.json"), os.path.join(root, "_bench_manifest.json"))
    np.savez(meta + ".tmp.npz", orig=orig, copy=copy, sim=sim)
    os.replace(meta + ".tmp.npz", meta)
    return root, {"orig": orig, "copy": copy, "sim": sim}, time.time() - t


def reset(root: str) -> None:
    """Back to the state before any dedup ran (both paths write the same sidecar and records)."""
    shutil.rmtree(os.path.join(root, "dedup"), ignore_errors=True)
    shutil.rmtree(os.path.join(root, "_progress", "dedup"), ignore_errors=True)
    shutil.copy(os.path.join(root, "_bench_manifest.json"), os.path.join(root, "_manifest.json"))


def old_package(work: str, commit: str) -> str:
    """A folder holding ``webcurate/{curation,shards}`` as of ``commit`` (for PYTHONPATH)."""
    top = os.path.join(work, f"old_{commit}")
    pkg = os.path.join(top, "webcurate")
    if not os.path.isdir(os.path.join(pkg, "curation")):
        os.makedirs(pkg, exist_ok=True)
        archive = subprocess.run(["git", "-C", ROOT, "archive", commit, "curation", "shards"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", pkg], input=archive, check=True)
        open(os.path.join(pkg, "__init__.py"), "w").close()
    return top


# -- measuring -----------------------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _descendants(pid: int) -> list[int]:
    parent: dict[int, int] = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            st = _read(f"/proc/{e}/stat")
            if st:
                parent[int(e)] = int(st[st.rfind(")") + 2:].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    return out


@dataclass
class Proc:
    role: str
    hwm: int = 0  # bytes, VmHWM (peak RSS)
    anon: int = 0  # bytes, peak RssAnon (private)
    cpu: float = 0.0
    title: str = ""
    start: str = ""  # start time (clock ticks after boot): tells this process from a later one with its id


@dataclass
class Sampler:
    """Samples a process tree from /proc until stopped: per-process peaks, CPU per task step, tree peak."""

    pid: int
    every: float = 0.2
    procs: dict[int, Proc] = field(default_factory=dict)
    cpu_by_step: dict[str, float] = field(default_factory=dict)
    tree_peak: int = 0  # bytes: sum of RssAnon over the tree + object store (/dev/shm) growth
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.shm0 = self._shm()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    @staticmethod
    def _shm() -> int:
        st = os.statvfs("/dev/shm")
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.every)

    def sample(self) -> None:
        anon_sum = 0
        for p in _descendants(self.pid):
            status, stat = _read(f"/proc/{p}/status"), _read(f"/proc/{p}/stat")
            if not status or not stat:
                continue
            kv = {ln.split(":")[0]: ln.split()[1] for ln in status.splitlines() if ln.startswith(("Vm", "Rss"))}
            title = _read(f"/proc/{p}/cmdline").split("\0")[0]
            role = ("driver" if p == self.pid else "task" if title.startswith("ray::") else
                    os.path.basename(title.split()[0]) if title else "?")
            f = stat[stat.rfind(")") + 2:].split()
            rec = self.procs.setdefault(p, Proc(role, start=f[19]))
            rec.role = "task" if role == "task" else rec.role
            hwm, anon = int(kv.get("VmHWM", 0)) * 1024, int(kv.get("RssAnon", 0)) * 1024
            rec.hwm = max(rec.hwm, hwm)
            if anon > rec.anon:  # the step running while its private memory peaked
                rec.anon, rec.title = anon, title if role == "task" and title != "ray::IDLE" else rec.title
            anon_sum += anon
            cpu = (int(f[11]) + int(f[12])) / self.tick
            step = "driver" if p == self.pid else (title[5:].replace("webcurate:", "") or "?") \
                if role == "task" else "ray system"
            self.cpu_by_step[step] = self.cpu_by_step.get(step, 0.0) + cpu - rec.cpu
            rec.cpu = cpu
        self.tree_peak = max(self.tree_peak, anon_sum + max(0, self._shm() - self.shm0))

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()

    def largest_task(self) -> Proc:
        tasks = [p for p in self.procs.values() if p.role == "task"]
        return max(tasks, key=lambda p: p.hwm) if tasks else Proc("task")


def _vm_hwm(pid: int | str) -> int:
    """Peak RSS of this process image in bytes (``VmHWM``; 0 when gone)."""
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child_main(argv: list[str]) -> None:
    """In the child: run one path's run_dedup on ``root``; prints one JSON line."""
    path, root, k, threshold, memory = argv[0], argv[1], int(argv[2]), float(argv[3]), argv[4]

    from webcurate.curation import dedup

    trace = os.environ.get("CURATION_SCALE_TRACE") == "1" and path == "new"
    if trace:
        import _driver_trace

        _driver_trace.install()
    t = time.time()
    if path == "old":
        res = dedup.run_dedup(root, method="copy", k=k, threshold=threshold, summary=False)
        info = {"counts": res["counts"], "timings": res.get("timings"), "edges": res.get("edges"),
                "index": res.get("index")}
    else:
        res = dedup.run_dedup(root, method="copy", k=k, threshold=threshold, summary=False,
                              resources={"memory_per_task": memory})
        info = {"counts": res.totals, **{k: v for k, v in res.info.items() if isinstance(v, (int, float, str))}}
        from webcurate.curation.stage_params import TaskResources

        info["memory_per_task_bytes"] = TaskResources(memory_per_task=memory).task_memory()
    wall = time.time() - t
    print("RESULT " + json.dumps({"wall": wall, "module": dedup.__file__, "info": info,
                                  "driver_hwm": _vm_hwm("self"),
                                  **({"driver_trace": _driver_trace.report()} if trace else {})}),
          flush=True)


def run_path(path: str, root: str, args, work: str, deadline: float) -> dict:
    """One path as a child process, sampled; the child is killed at ``deadline``."""
    reset(root)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "WEBCURATE_QUIET": "1",
           "CURATION_SCALE_TRACE": "1" if args.trace else "0"}
    if path == "old":
        env["PYTHONPATH"] = old_package(work, args.old_commit)
    log = os.path.join(work, f"{os.path.basename(root)}_{path}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "_child", path, root, str(args.k), str(args.threshold),
           args.memory_per_task]
    load0 = os.getloadavg()[0]
    t = time.time()
    with open(log, "w") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        sampler = Sampler(child.pid)
        killed = False
        while child.poll() is None:
            if time.time() > deadline:
                killed = True
                for p in reversed(_descendants(child.pid)):  # this run's own processes, by id
                    try:
                        os.kill(p, 9)
                    except ProcessLookupError:
                        pass
            time.sleep(0.2)
        sampler.finish()
    proc_wall = time.time() - t
    _reap(sampler)
    lines = [ln for ln in _read(log).splitlines() if ln.startswith("RESULT ")]
    if killed or child.returncode != 0 or not lines:
        why = "killed at the deadline" if killed else f"exit {child.returncode}, see {log}"
        return {"path": path, "error": why, "proc_wall": proc_wall}
    got = json.loads(lines[-1][7:])
    big = sampler.largest_task()
    return {"path": path, **got, "proc_wall": proc_wall, "load_before": load0, "load_after": os.getloadavg()[0],
            "driver_peak": max(got["driver_hwm"], sampler.procs[child.pid].hwm if child.pid in sampler.procs
                               else 0),
            "driver_anon": sampler.procs.get(child.pid, Proc("driver")).anon,
            "task_peak": big.hwm, "task_anon": big.anon, "task_title": big.title,
            "tasks_seen": sum(p.role == "task" for p in sampler.procs.values()),
            "tree_peak": sampler.tree_peak, "cpu": sum(sampler.cpu_by_step.values()),
            "cpu_by_step": {k: round(v, 1) for k, v in sorted(sampler.cpu_by_step.items(), key=lambda kv: -kv[1])}}


def _started(pid: int) -> str:
    st = _read(f"/proc/{pid}/stat")
    return st[st.rfind(")") + 2:].split()[19] if st else ""


def _reap(sampler: Sampler, wait: float = 15.0) -> None:
    """Ray's processes of this run normally exit with the driver; kill (by id) any still there after ``wait``."""
    end = time.time() + wait
    alive = [p for p, r in sampler.procs.items() if _started(p) == r.start]
    while alive and time.time() < end:
        time.sleep(0.5)
        alive = [p for p in alive if _started(p) == sampler.procs[p].start]
    for p in alive:
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass
    if alive:
        print(f"  killed {len(alive)} leftover process(es) of the run: {alive}", flush=True)


def keepers(root: str) -> np.ndarray:
    """(N,) int64: the row each row's kept sample is (itself when kept), from the dedup sidecar."""
    import glob

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.ParquetDataset(sorted(glob.glob(os.path.join(root, "dedup", "*.parquet")))).read(
        columns=["key", "keep", "duplicate_of"])

    def rows(col) -> np.ndarray:
        return pc.cast(pc.utf8_slice_codeunits(col, 1), "int64").to_numpy(zero_copy_only=False)

    row = rows(t["key"])
    keep = t["keep"].to_numpy(zero_copy_only=False)
    dup = rows(pc.fill_null(t["duplicate_of"], "p0"))
    out = np.empty(int(row.max()) + 1, dtype=np.int64)
    out[row] = np.where(keep, row, dup)
    return out


def quality(keeper: np.ndarray, pairs: dict) -> dict:
    same = keeper[pairs["orig"]] == keeper[pairs["copy"]]
    removed = keeper != np.arange(len(keeper))
    member = np.zeros(len(keeper), bool)
    member[pairs["orig"]] = member[pairs["copy"]] = True
    lo = pairs["sim"] < 0.8
    return {"recall": float(same.mean()), "recall_lo": float(same[lo].mean()) if lo.any() else 1.0,
            "precision": float(member[removed].mean()) if removed.any() else 1.0, "removed": int(removed.sum())}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors in all")
    ap.add_argument("--sizes", default=None, help="comma-separated N values (overrides --n), e.g. 1000000,4000000")
    ap.add_argument("--paths", default="old,new", help="old (single process), new (Ray tasks), or both")
    ap.add_argument("--quick", action="store_true", help="N = 50,000")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=0.6)
    ap.add_argument("--memory-per-task", default="auto", help="new path: --memory-per-task (auto: the product default)")
    ap.add_argument("--old-commit", default=OLD_COMMIT)
    ap.add_argument("--workdir", default=os.path.join(ROOT, "bench", "_work", "curation_scale"))
    ap.add_argument("--deadline", default=None, help="UTC HH:MM[:SS]: a run still going then is killed")
    ap.add_argument("--trace", action="store_true", help="new path: the driver's private memory per step "
                    "(bench/_driver_trace.py), printed after the run")
    ap.add_argument("--json", default=None, help="append each run's figures as a JSON line to this file")
    ap.add_argument("--project", default=None, metavar="JSONL", help="only print the 1B-on-paper model "
                    "calibrated on the runs in this file (bench/_curation_scale_model.py)")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _curation_scale_model import report, table

    if args.project:
        print("\n".join(report(args.project, args.dim)))
        return
    sizes = [50_000] if args.quick else [int(s) for s in (args.sizes or str(args.n)).split(",")]
    paths = [p for p in args.paths.split(",") if p]
    deadline = float("inf")
    if args.deadline:  # today, UTC
        hms = (args.deadline + ":00")[:8]
        deadline = time.mktime(time.strptime(time.strftime("%Y-%m-%d ", time.gmtime()) + hms,
                                             "%Y-%m-%d %H:%M:%S")) - time.timezone
    os.makedirs(args.workdir, exist_ok=True)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"# curation_scale: sizes {sizes}, paths {paths}, D={args.dim} k={args.k} threshold={args.threshold} "
          f"memory-per-task {args.memory_per_task}; commit {commit}, old path {args.old_commit}; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    for n in sizes:
        pairs = n // 20
        root, planted, made = pool_dataset(args.workdir, n, args.dim, pairs)
        print(f"N={n:,}: dataset {root} ({pairs:,} planted pairs)" + (f", made in {made:.0f} s" if made else ""),
              flush=True)
        runs: dict[str, dict] = {}
        keep: dict[str, np.ndarray] = {}
        for path in paths:
            r = run_path(path, root, args, args.workdir, deadline)
            if "error" not in r:
                keep[path] = keepers(root)
                r.update(quality(keep[path], planted))
            runs[path] = {**r, "n": n, "dim": args.dim}
            print(f"  {path}: " + json.dumps({k: v for k, v in r.items() if k not in ("info", "driver_trace")}, default=str),
                  flush=True)
            print(f"  {path} info: {json.dumps(r.get('info'), default=str)}", flush=True)
            for step in r.get("driver_trace", []):
                print(f"    driver {step['step']:<32} {step['s']:>7.1f} s  private MiB start {step['start']:>7.1f}"
                      f"  peak {step['peak']:>7.1f}  end {step['end']:>7.1f}", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({**runs[path], "commit": commit}, default=str) + "\n")
        if len(keep) == 2:
            runs["new"]["agreement"] = float((keep["old"] == keep["new"]).mean())
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"path": "agreement", "n": n, "agreement": runs["new"]["agreement"]}) + "\n")
        print("\n" + "\n".join(table(n, runs)) + "\n", flush=True)


if __name__ == "__main__":
    main()
