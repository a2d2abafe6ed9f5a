"""dedup -> cluster -> sample as Ray tasks on a real 2-node cluster (127.0.0.1): tasks on both nodes,
the same bytes as a single-node run, and a worker node killed mid-stage costs nothing.

The pool is index-only (tests/curation/synthetic_pool.py): the global stages read the index and the
sidecars, never the tars. A small --memory-per-task cuts the work into many tasks.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from helpers import load_helper

HERE = pathlib.Path(__file__).parent
pytestmark = pytest.mark.slow

_DRIVER = """
import json, sys
from webcurate.curation.cluster import run_cluster
from webcurate.curation.dedup import run_dedup
from webcurate.curation.sample import run_sample
root, res = sys.argv[1], {"memory_per_task": "16MiB"}
run_dedup(root, k=8, threshold=0.6, index="ivf", resources=res, summary=False)
run_cluster(root, levels="12,3", resampling_steps=2, resources=res, summary=False)
run_sample(root, 600, resources=res, summary=False)
nodes = []
if len(sys.argv) > 2:
    from ray.util.state import list_tasks
    nodes = sorted({t.node_id for t in list_tasks(limit=10000, raise_on_missing_output=False)
                    if (t.name or "").startswith("webcurate:") and t.node_id})
print(json.dumps({"nodes": nodes}))
"""

STAGES = ("dedup", "clusters", "sample")


def _parts(root: str) -> dict[str, bytes]:
    out = {}
    for stage in STAGES:
        for p in sorted(pathlib.Path(root, stage).glob("part-*.parquet")):
            out[f"{stage}/{p.name}"] = p.read_bytes()
    return out


def _run(root: str, env: dict[str, str], *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _DRIVER, root, *extra], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_global_stages_spread_over_two_nodes_survive_a_worker_kill_and_match_one_node(tmp_path):
    ray_cluster = load_helper(HERE / "ray_cluster.py")
    sp = load_helper(HERE.parent / "curation" / "synthetic_pool.py")
    base = str(tmp_path / "base")
    x, _, _ = sp.planted_vectors(8000, 64, 300, seed=11)
    sp.write_pool(base, x, 400)
    local_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    local_env["WEBCURATE_QUIET"] = "1"
    ref, on_cluster, killed = (str(tmp_path / n) for n in ("ref", "cluster", "killed"))
    for d in (ref, on_cluster, killed):
        shutil.copytree(base, d)

    # Single node: the driver's own local Ray.
    p = _run(ref, local_env)
    assert p.returncode == 0, p.stderr[-3000:]
    expected = _parts(ref)
    assert len(expected) == 3 * 20

    with ray_cluster.local_ray_cluster(num_nodes=2, cpus_per_node=1, dashboard=True) as cluster:
        env = {**cluster.env(), "WEBCURATE_QUIET": "1"}
        p = _run(on_cluster, env, "--nodes")
        assert p.returncode == 0, p.stderr[-3000:]
        assert len(json.loads(p.stdout.strip().splitlines()[-1])["nodes"]) == 2, "tasks ran on one node only"
        assert _parts(on_cluster) == expected

        # Kill the worker node once dedup has started; Ray retries its tasks on the head (or a re-run
        # finishes the stage), and the parts come out the same.
        driver = subprocess.Popen([sys.executable, "-c", _DRIVER, killed], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        record = pathlib.Path(killed, "_progress", "dedup", "stage.json")
        try:
            deadline = time.time() + 300
            while not record.exists() and driver.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            assert record.exists(), driver.communicate(timeout=5)[1][-3000:] if driver.poll() is not None else ""
            assert "finished" not in json.loads(record.read_text()), "dedup finished before the kill"
            cluster.kill_worker()
            _, err = driver.communicate(timeout=600)
        finally:
            if driver.poll() is None:
                driver.kill()
        if driver.returncode != 0:
            assert "re-run" in err, err[-3000:]  # a stage that gave up says how to resume
            p = _run(killed, env)
            assert p.returncode == 0, p.stderr[-3000:]
    assert _parts(killed) == expected
