"""Benchmark: `webcurate shard` vs img2dataset on the same URL list, same machine, same run.

What it does:

1. generates N JPEG photos of 300-1200 px (cached in ``bench/_work/photos``);
2. serves them on 127.0.0.1 from a separate aiohttp process (sendfile; cheap,
   so the tools, not the server, use the cores);
3. installs img2dataset into its own venv ``bench/_work/img2dataset-venv``
   (once; checks that no torch came with it);
4. downloads the same URL list with both tools, each with 2 processes and 16
   threads per process, resizing to 256 keep_ratio at JPEG quality 95, same
   shard size; prints wall-clock images/s and the ratio;
5. also times `webcurate shard` on the local photo folder.

Times are whole commands as a user runs them (start-up included: Ray for us,
the process pool for img2dataset). Use ``--repeat 2`` to alternate the order.

    .venv/bin/python bench/ingest_vs_img2dataset.py                       # 3000 photos
    .venv/bin/python bench/ingest_vs_img2dataset.py --n 12000 --warm-ray  # + a reused Ray cluster
    .venv/bin/python bench/ingest_vs_img2dataset.py --quick               # 600 photos
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORK = os.path.join(HERE, "_work")
I2D_VENV = os.path.join(WORK, "img2dataset-venv")
I2D_VERSION = "1.47.0"  # pinned: the results name this version
SERVER = os.path.join(REPO, "tests", "shards", "http_server.py")


def load_imagegen():
    spec = importlib.util.spec_from_file_location("bench_imagegen", os.path.join(REPO, "tests", "shards", "imagegen.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its functions go to a process pool: pickled by module name
    spec.loader.exec_module(mod)
    return mod


def ensure_img2dataset() -> str:
    """Path of the img2dataset executable in its own venv (created on first use)."""
    exe = os.path.join(I2D_VENV, "bin", "img2dataset")
    if not os.path.exists(exe):
        base = os.path.join(sys.base_prefix, "bin", "python3")
        print(f"installing img2dataset into {I2D_VENV} (once) ...", flush=True)
        subprocess.run([base, "-m", "venv", I2D_VENV], check=True)
        pip = os.path.join(I2D_VENV, "bin", "pip")
        # img2dataset needs no torch; --dry-run first so a dependency that wanted one is caught.
        spec = f"img2dataset=={I2D_VERSION}"
        report = subprocess.run([pip, "install", "--dry-run", "--quiet", "--report", "-", spec],
                                capture_output=True, text=True, check=True).stdout
        wanted = [p["metadata"]["name"].lower() for p in json.loads(report)["install"]]
        if any(n in ("torch", "torchvision") or n.startswith("nvidia-") for n in wanted):
            raise SystemExit(f"img2dataset would pull torch/CUDA packages: {wanted}; install it with --no-deps")
        subprocess.run([pip, "install", "--quiet", spec], check=True)
    return exe


def pkg_version(python: str, name: str) -> str:
    out = subprocess.run([python, "-c", f"from importlib.metadata import version; print(version({name!r}))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


def start_server(photos: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, SERVER, "--aiohttp", "--bulk-dir", photos],
                            stdout=subprocess.PIPE, text=True)
    base = proc.stdout.readline().strip()
    if not base.startswith("http://"):
        proc.kill()
        raise SystemExit("image server did not start")
    return proc, base


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user+sys CPU seconds of that process alone) from /proc.

    Children's times are left out: a reaped child's time moves into its
    parent's counters, and we already count the child itself.
    """
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # ended meanwhile
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        ppid = int(fields[1])
        utime, stime = int(fields[11]), int(fields[12])
        out[int(name)] = (ppid, (utime + stime) / tick)
    return out


def _tree_cpu(root: int, seen: dict[int, float]) -> None:
    """Record the CPU seconds of ``root`` and all its descendants (latest value per pid)."""
    stats = _proc_stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            seen[pid] = max(seen.get(pid, 0.0), stats[pid][1])
        todo.extend(children.get(pid, []))


def run_timed(cmd: list[str], env: dict[str, str], log: str, sample=None) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, CPU seconds of its whole process tree).

    CPU time is sampled every 0.2 s per process (a process that ends between
    samples loses at most its last 0.2 s), so it stays meaningful when other
    work shares the machine, where wall time does not.
    """
    seen: dict[int, float] = {}
    t0 = time.time()
    with open(log, "w") as f:
        popen = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        while popen.poll() is None:
            _tree_cpu(popen.pid, seen)
            if sample is not None:
                sample()
            time.sleep(0.2)
    if sample is not None:
        sample()
    seconds = time.time() - t0
    if popen.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed (rc {popen.returncode}); see {log}")
    return seconds, sum(seen.values())


def run_img2dataset(exe: str, url_list: str, out: str, shard_size: int, log: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [exe, "--url_list", url_list, "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
           "--output_format", "webdataset", "--output_folder", out, "--processes_count", "2",
           "--thread_count", "16", "--image_size", "256", "--resize_mode", "keep_ratio", "--encode_quality", "95",
           "--number_sample_per_shard", str(shard_size), "--timeout", "10", "--retries", "0",
           "--enable_wandb", "False", "--distributor", "multiprocessing"]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    seconds, cpu = run_timed(cmd, env, log)
    ok = 0
    for path in glob.glob(os.path.join(out, "*_stats.json")):
        with open(path) as f:
            ok += int(json.load(f).get("successes", 0))
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(out, "*.tar")))
    return {"seconds": seconds, "cpu_seconds": cpu, "ok": ok, "tar_bytes": size, "command": " ".join(cmd[1:])}


class WarmCluster:
    """A local Ray cluster left running for several commands (tests/e2e/ray_cluster.py: its own
    token, its processes found by a marker), whose CPU during a command is counted with it."""

    def __init__(self, num_cpus: int = 2):
        import contextlib

        sys.path.insert(0, os.path.join(REPO, "tests"))
        from helpers import load_helper

        ray_cluster = load_helper(os.path.join(REPO, "tests", "e2e", "ray_cluster.py"))
        self._stack = contextlib.ExitStack()
        self.cluster = self._stack.enter_context(
            ray_cluster.local_ray_cluster(num_nodes=1, cpus_per_node=num_cpus, dashboard=False, object_store_mb=400))

    def env(self) -> dict[str, str]:
        return self.cluster.env()

    def cpu_by_pid(self, seen: dict[int, float] | None = None) -> dict[int, float]:
        """CPU seconds of each of the cluster's processes (the latest value per pid kept in ``seen``)."""
        seen = {} if seen is None else seen
        stats = _proc_stats()
        for pid in self.cluster.head.pids():
            if pid in stats:
                seen[pid] = max(seen.get(pid, 0.0), stats[pid][1])
        return seen

    def stop(self) -> None:
        self._stack.close()


def run_webcurate(input_uri: str, out: str, shard_size: int, log: str, cluster: WarmCluster | None = None) -> dict:
    """One `webcurate shard` command; with ``cluster`` it joins that running Ray (``RAY_ADDRESS``)
    and the cluster's CPU during the command is counted with the command's own."""
    shutil.rmtree(out, ignore_errors=True)
    exe = os.path.join(os.path.dirname(sys.executable), "webcurate")
    cmd = [exe, "shard", "--input", input_uri, "--output", out, "--workers", "2", "--threads", "16",
           "--shard-size", str(shard_size), "--image-size", "256", "--resize-mode", "keep_ratio", "--quality", "95"]
    if "://" in input_uri or input_uri.endswith(".parquet"):
        cmd.append("--allow-private-addresses")  # the photos are served from 127.0.0.1
    env = dict(os.environ, WEBCURATE_QUIET="1")
    env.pop("RAY_ADDRESS", None)
    sample = None
    if cluster is not None:
        env.update(cluster.env())
        before = cluster.cpu_by_pid()
        during = dict(before)

        def sample() -> None:  # sampled like the command's own tree: a worker that exits keeps its share
            cluster.cpu_by_pid(during)
    seconds, cpu = run_timed(cmd, env, log, sample)
    if cluster is not None:
        cpu += sum(v - before.get(pid, 0.0) for pid, v in during.items())
    with open(os.path.join(out, "_manifest.json")) as f:
        counts = json.load(f)["counts"]
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(out, "shards", "*.tar")))
    # The CLI prints the time spent in the shard tasks (no Ray start-up, no list reading).
    stage_seconds = None
    with open(log) as f:
        for line in f:
            if line.startswith("wrote ") and line.rstrip().endswith("s"):
                try:
                    stage_seconds = float(line.rsplit(" in ", 1)[1].rstrip().rstrip("s"))
                except ValueError:
                    pass
    return {"seconds": seconds, "cpu_seconds": cpu, "ok": int(counts.get("ok", 0)), "tar_bytes": size,
            "stage_seconds": stage_seconds, "ray": "warm cluster" if cluster else "started by the command",
            "command": ("RAY_ADDRESS=... " if cluster else "") + "webcurate " + " ".join(cmd[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3000, help="number of photos (default 3000)")
    ap.add_argument("--quick", action="store_true", help="600 photos, for a fast check")
    ap.add_argument("--shard-size", type=int, default=500, help="samples per shard, both tools (default 500)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each tool, alternating which goes first")
    ap.add_argument("--img2dataset-first", action="store_true",
                    help="start with img2dataset (runs still alternate with --repeat)")
    ap.add_argument("--skip-img2dataset", action="store_true")
    ap.add_argument("--skip-folder", action="store_true", help="skip the local-folder ingest timing")
    ap.add_argument("--warm-ray", action="store_true",
                    help="also run webcurate against a Ray cluster started once beforehand (RAY_ADDRESS), "
                         "counting the cluster's CPU during the command")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    n = 600 if args.quick else args.n

    gen = load_imagegen()
    photos = os.path.join(WORK, "photos")
    t0 = time.time()
    gen.generate_photos(photos, n)
    print(f"{n} photos in {photos} ({time.time() - t0:.0f}s to prepare)", flush=True)
    run_dir = os.path.join(WORK, "ingest")
    os.makedirs(run_dir, exist_ok=True)
    # Only the first n photos: a folder with exactly them for the folder ingest.
    folder = os.path.join(run_dir, f"folder-{n}")
    if not os.path.isdir(folder) or len(os.listdir(folder)) != n:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for i in range(n):
            os.link(os.path.join(photos, f"{i:05d}.jpg"), os.path.join(folder, f"{i:05d}.jpg"))

    i2d = None if args.skip_img2dataset else ensure_img2dataset()
    server, base = start_server(photos)
    results: dict[str, list[dict]] = {"img2dataset": [], "webcurate": [], "webcurate_folder": [],
                                      "webcurate_warm": []}
    cluster = WarmCluster() if args.warm_ray else None
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        url_list = os.path.join(run_dir, f"urls-{n}.parquet")
        pq.write_table(pa.table({"url": [f"{base}/bulk/{i:05d}.jpg" for i in range(n)],
                                 "caption": [f"photo {i}" for i in range(n)]}), url_list)
        for rep in range(args.repeat):
            ours_first = (rep + args.img2dataset_first) % 2 == 0
            order = ["webcurate", "img2dataset"] if ours_first else ["img2dataset", "webcurate"]
            if cluster is not None:
                order.insert(1, "webcurate_warm")
            for tool in order:
                load = os.getloadavg()[0]  # 1-min load just before the run: other work on the cores shows here
                if tool == "img2dataset" and i2d:
                    r = run_img2dataset(i2d, url_list, os.path.join(run_dir, "out-img2dataset"), args.shard_size,
                                        os.path.join(run_dir, f"img2dataset-{rep}.log"))
                elif tool == "webcurate":
                    r = run_webcurate(url_list, os.path.join(run_dir, "out-webcurate"), args.shard_size,
                                      os.path.join(run_dir, f"webcurate-{rep}.log"))
                elif tool == "webcurate_warm":
                    r = run_webcurate(url_list, os.path.join(run_dir, "out-webcurate-warm"), args.shard_size,
                                      os.path.join(run_dir, f"webcurate-warm-{rep}.log"), cluster=cluster)
                else:
                    continue
                r["load_before"] = load
                results[tool].append(r)
                print(f"{tool:12s} run {rep} (load before {load:.2f}): {r['ok']} ok in {r['seconds']:.1f}s = "
                      f"{r['ok'] / r['seconds']:.1f} img/s, "
                      f"{1000 * r['cpu_seconds'] / max(r['ok'], 1):.1f} CPU-ms/img", flush=True)
        if not args.skip_folder:
            r = run_webcurate(folder, os.path.join(run_dir, "out-folder"), args.shard_size,
                              os.path.join(run_dir, "webcurate-folder.log"))
            results["webcurate_folder"].append(r)
            print(f"folder ingest: {r['ok']} ok in {r['seconds']:.1f}s = {r['ok'] / r['seconds']:.1f} img/s, "
                  f"{1000 * r['cpu_seconds'] / max(r['ok'], 1):.1f} CPU-ms/img", flush=True)
    finally:
        server.terminate()
        server.wait(10)
        if cluster is not None:
            cluster.stop()

    def best(tool: str) -> dict | None:
        runs = results[tool]
        return max(runs, key=lambda r: r["ok"] / r["seconds"]) if runs else None

    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, load average now "
          f"{os.getloadavg()[0]:.1f}; python {platform.python_version()}")
    print(f"{'tool':34s} {'ok':>6s} {'seconds':>8s} {'img/s':>8s} {'CPU-ms/img':>11s} {'MB out':>8s}")
    rows = [("img2dataset " + (pkg_version(os.path.join(I2D_VENV, 'bin', 'python'), 'img2dataset') if i2d else ''),
             best("img2dataset")),
            ("webcurate shard (URLs)", best("webcurate")),
            ("webcurate shard (URLs, warm Ray)", best("webcurate_warm")),
            ("webcurate shard (folder)", best("webcurate_folder"))]
    for name, r in rows:
        if r:
            print(f"{name:34s} {r['ok']:6d} {r['seconds']:8.1f} {r['ok'] / r['seconds']:8.1f} "
                  f"{1000 * r['cpu_seconds'] / max(r['ok'], 1):11.1f} {r['tar_bytes'] / 1e6:8.1f}")
    w, i = best("webcurate"), best("img2dataset")
    for label, r in (("", w), (" (warm Ray)", best("webcurate_warm"))):
        if r and r.get("stage_seconds"):
            print(f"webcurate shard task rate{label} (shard tasks alone, no Ray start-up): "
                  f"{r['ok'] / r['stage_seconds']:.1f} img/s")
    ww = best("webcurate_warm")
    if ww and i:
        print(f"ratio webcurate (warm Ray) / img2dataset (URLs, wall clock): "
              f"{(ww['ok'] / ww['seconds']) / (i['ok'] / i['seconds']):.2f}x; CPU per image img2dataset / webcurate: "
              f"{(i['cpu_seconds'] / i['ok']) / (ww['cpu_seconds'] / ww['ok']):.2f}x")
    if w and i:
        print(f"ratio webcurate / img2dataset (URLs, wall clock): {(w['ok'] / w['seconds']) / (i['ok'] / i['seconds']):.2f}x")
        print(f"ratio img2dataset / webcurate CPU per image (whole process trees): "
              f"{(i['cpu_seconds'] / i['ok']) / (w['cpu_seconds'] / w['ok']):.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": n, "shard_size": args.shard_size, "results": results,
                       "loadavg": os.getloadavg()}, f, indent=2)


if __name__ == "__main__":
    main()
