"""Job submission: `webcurate submit` vs Ray's own `ray job submit`, side by side, on one real head.

Starts a 1-node Ray head with its Job API on 127.0.0.1 (tests/e2e/ray_cluster.py),
then times, end to end (process start -> job SUCCEEDED -> logs printed -> exit),
the same trivial job submitted by

  ray job submit                      the peer (Ray's CLI), waits and streams logs
  webcurate submit --no-ship-package  ours, same work: submit, stream, exit with status
  python -m webcurate.pipeline.jobs_cli submit --no-ship-package   ours, the light entry point
  ray job submit --runtime-env-json '{"py_modules": [<webcurate copy>]}'   peer, shipping our code
  webcurate submit                    ours, shipping this machine's webcurate (py_modules)

and the lifecycle of a 2-node test cluster: ours (`local_ray_cluster`, real
`ray start` processes) vs Ray's `ray.cluster_utils.Cluster` (start 2 nodes, run
one task per node, shut down).

    .venv/bin/python bench/jobs_submit_vs_ray_cli.py [--quick] [--repeats N] [--no-cluster-utils]

Prints one line per method (median / min seconds) and the ratio to the peer.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JOB = ["python", "-c", "print('hello from the job')"]


def _load_ray_cluster():
    spec = importlib.util.spec_from_file_location("wc_ray_cluster_bench", REPO / "tests" / "e2e" / "ray_cluster.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _time(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    dt = time.perf_counter() - t
    if p.returncode != 0 or "hello from the job" not in p.stdout + p.stderr:
        raise RuntimeError(f"{cmd[:3]} failed ({p.returncode}):\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}")
    return dt


def bench_submit(rc, repeats: int) -> list[tuple[str, list[float]]]:
    from webcurate.pipeline.jobs import package_snapshot

    with rc.local_ray_cluster(num_nodes=1, cpus_per_node=1, dashboard=True) as cluster, \
            tempfile.TemporaryDirectory() as tmp:
        env = cluster.env()
        url = cluster.dashboard_url
        pkg = package_snapshot(tmp)
        methods = [
            ("ray job submit (peer)", [str(BIN / "ray"), "job", "submit", "--address", url, "--", *JOB]),
            ("webcurate submit --no-ship-package", [str(BIN / "webcurate"), "submit", "--address", url,
                                                    "--no-ship-package", "--", *JOB]),
            ("python -m webcurate.pipeline.jobs_cli submit --no-ship-package",
             [sys.executable, "-m", "webcurate.pipeline.jobs_cli", "submit", "--address", url,
              "--no-ship-package", "--", *JOB]),
            ("ray job submit + py_modules=webcurate (peer)",
             [str(BIN / "ray"), "job", "submit", "--address", url, "--runtime-env-json",
              json.dumps({"py_modules": [str(pkg)]}), "--", *JOB]),
            ("webcurate submit (ships webcurate)", [str(BIN / "webcurate"), "submit", "--address", url, "--", *JOB]),
        ]
        _time(methods[0][1], env)  # warm-up: first job on a fresh head starts the job agent's workers
        out = []
        for name, cmd in methods:
            out.append((name, [_time(cmd, env) for _ in range(repeats)]))
            print(f"  {name:<66} {statistics.median(out[-1][1]):6.2f} s", file=sys.stderr)
        return out


_TASKS = """
import os, ray
@ray.remote(num_cpus=1)
def where():
    return os.environ.get("WEBCURATE_TEST_RAY_NODE", "?")
print(ray.get([where.options(resources={f"wc_node{i}": 0.01}).remote() for i in range(2)]))
"""


def bench_cluster(rc, with_cluster_utils: bool) -> list[tuple[str, list[float]]]:
    out = []
    t = time.perf_counter()
    with rc.local_ray_cluster(num_nodes=2, cpus_per_node=1, dashboard=False) as cluster:
        p = subprocess.run([sys.executable, "-c", "import ray; ray.init()\n" + _TASKS], env=cluster.env(),
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
    out.append(("local_ray_cluster(2 nodes): start, task per node, stop", [time.perf_counter() - t]))
    if with_cluster_utils:
        code = (
            "import time, ray\n"
            "from ray.cluster_utils import Cluster\n"
            "t = time.perf_counter()\n"
            "c = Cluster(initialize_head=True, head_node_args={'num_cpus': 1, 'resources': {'wc_node0': 1},"
            f" 'include_dashboard': False, 'object_store_memory': 100 * 2**20, 'min_worker_port': 0,"
            f" 'max_worker_port': 0, 'dashboard_agent_listen_port': {rc.free_port()}}})\n"
            "c.add_node(num_cpus=1, resources={'wc_node1': 1}, object_store_memory=100 * 2**20,"
            " min_worker_port=0, max_worker_port=0)\n"
            "c.wait_for_nodes()\n"
            "ray.init(address=c.address)\n" + _TASKS.replace("import os, ray", "import os") +
            "ray.shutdown(); c.shutdown()\n"
            "print('SECONDS', time.perf_counter() - t)\n")
        # RAY_TMPDIR of its own: Cluster writes <tmp>/ray/ray_current_cluster, which in the
        # default /tmp/ray would send every other `ray.init()` on this machine to it.
        tmp = tempfile.mkdtemp(prefix="wcbench-", dir="/tmp")
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": tmp})
        total = time.perf_counter() - t
        shutil.rmtree(tmp, ignore_errors=True)
        if p.returncode != 0:
            print(f"ray.cluster_utils.Cluster failed:\n{p.stderr[-2000:]}", file=sys.stderr)
        else:
            out.append(("ray.cluster_utils.Cluster(2 nodes) (peer): same", [total]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="submissions per method (median reported)")
    ap.add_argument("--quick", action="store_true", help="2 submissions per method")
    ap.add_argument("--no-cluster-utils", action="store_true", help="skip the ray.cluster_utils.Cluster peer")
    a = ap.parse_args()
    repeats = 2 if a.quick else a.repeats
    rc = _load_ray_cluster()
    print(f"load average before: {os.getloadavg()[0]:.1f} (2-core CPU, no GPU)", file=sys.stderr)
    rows = bench_submit(rc, repeats)
    rows += bench_cluster(rc, not a.no_cluster_utils)
    peer = statistics.median(rows[0][1])
    peer_ship = statistics.median(rows[3][1])
    print(f"\n{'method':<66} {'median s':>9} {'min s':>7} {'vs peer':>8}")
    for i, (name, ts) in enumerate(rows):
        med = statistics.median(ts)
        base = peer if i < 3 else peer_ship if i < 5 else statistics.median(rows[-1][1])
        print(f"{name:<66} {med:9.2f} {min(ts):7.2f} {med / base:7.2f}x")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
