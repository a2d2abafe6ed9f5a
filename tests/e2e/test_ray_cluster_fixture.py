"""The 2-node local Ray cluster helper (tests/e2e/ray_cluster.py) does what the e2e tests rely on.

One real cluster (``ray start --head`` + ``ray start --address``) per test run:
tasks reach each node through its custom resource, a worker node can be killed
mid-task (the task is retried on the head), a worker can be added back, and
stopping leaves no process of the cluster behind.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import load_helper


ray_cluster = load_helper(Path(__file__).parent / "ray_cluster.py")

# Each task reports which node ran it: the node marker every process of a node inherits.
_WHERE = """
import json, os, sys, time, ray
ray.init()

@ray.remote(num_cpus=1)
def where():
    return os.environ.get("WEBCURATE_TEST_RAY_NODE")

print(json.dumps({r: ray.get(where.options(resources={r: 0.01}).remote()) for r in sys.argv[1:]}))
"""

# A task that first lands on the worker (soft affinity), signals it started, and
# sleeps; when the worker node dies, Ray retries it on the head.
_MIDWAY = """
import json, os, sys, time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init()
flag = sys.argv[1]
worker = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("wc_node1")][0]

@ray.remote(num_cpus=1, max_retries=3)
def slow():
    here = os.environ.get("WEBCURATE_TEST_RAY_NODE")
    if "worker" in here:
        open(flag, "w").write(here)
        time.sleep(120)
    return here

ref = slow.options(scheduling_strategy=NodeAffinitySchedulingStrategy(worker, soft=True)).remote()
print(json.dumps({"ran_on": ray.get(ref, timeout=150)}))
"""


def _driver(cluster, code: str, *args: str, timeout: float = 120) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], env=cluster.env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_node_cluster_runs_tasks_per_node_survives_worker_kill_and_stops_cleanly(tmp_path):
    with ray_cluster.local_ray_cluster(num_nodes=2, cpus_per_node=1, dashboard=True) as cluster:
        head, worker = cluster.head, cluster.workers[0]
        assert cluster.address.startswith("127.0.0.1:")
        assert cluster.node_states() == {str(head.temp_dir): "ALIVE", str(worker.temp_dir): "ALIVE"}

        # The dashboard (Job Submission API) answers on loopback, behind the cluster's token.
        req = urllib.request.Request(f"{cluster.dashboard_url}/api/version",
                                     headers={"Authorization": f"Bearer {cluster.env()['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert "ray_version" in json.loads(r.read())
        with pytest.raises(urllib.error.HTTPError):  # and refuses callers without it
            urllib.request.urlopen(f"{cluster.dashboard_url}/api/version", timeout=10)

        # A custom resource pins a task to each node.
        where = _driver(cluster, _WHERE, "wc_node0", "wc_node1")
        assert where == {"wc_node0": str(head.temp_dir), "wc_node1": str(worker.temp_dir)}

        # Kill the worker node while a task runs there: Ray retries it on the head.
        flag = tmp_path / "started"
        driver = subprocess.Popen([sys.executable, "-c", _MIDWAY, str(flag)], env=cluster.env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 90
            while not flag.exists() and time.time() < deadline and driver.poll() is None:
                time.sleep(0.2)
            assert flag.exists(), driver.communicate(timeout=5)[1][-3000:] if driver.poll() is not None else ""
            worker_pids = worker.pids()
            head_pids = head.pids()
            assert worker_pids and head_pids
            cluster.kill_worker()
            out, err = driver.communicate(timeout=150)
        finally:
            if driver.poll() is None:
                driver.kill()
        assert driver.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1]) == {"ran_on": str(head.temp_dir)}
        assert not any(ray_cluster.pid_alive(p) for p in worker_pids)
        assert cluster.node_states()[str(worker.temp_dir)] == "DEAD"
        assert head.alive()

        # A replacement worker joins and takes tasks again.
        new = cluster.add_worker(num_cpus=1)
        assert _driver(cluster, _WHERE, new.resource) == {new.resource: str(new.temp_dir)}
        nodes = list(cluster.nodes)

    # Stopped: no process of any node remains, temp dirs are gone.
    for node in nodes:
        assert node.pids() == []
        assert not node.temp_dir.exists()
    assert not any(ray_cluster.pid_alive(p) for p in head_pids)


_OWNER = """
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("rc", sys.argv[1])
rc = importlib.util.module_from_spec(spec); spec.loader.exec_module(rc)
with rc.local_ray_cluster(num_nodes=2, cpus_per_node=1, dashboard=False) as c:
    print(json.dumps({"dirs": [str(n.temp_dir) for n in c.nodes], "state": str(c.state_file),
                      "pids": [p for n in c.nodes for p in n.pids()]}), flush=True)
    time.sleep(600)
"""


def test_cluster_is_cleaned_up_when_the_process_that_started_it_is_killed():
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, str(Path(__file__).parent / "ray_cluster.py")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = owner.stdout.readline()
        assert line, owner.stderr.read()[-3000:] if owner.poll() is not None else "no output"
        info = json.loads(line)
        assert info["pids"] and all(ray_cluster.pid_alive(p) for p in info["pids"][:3])
    finally:
        owner.kill()  # SIGKILL: no `finally`, no atexit in the owner runs
        owner.wait()
    deadline = time.time() + 60
    while time.time() < deadline and (any(ray_cluster.pid_alive(p) for p in info["pids"])
                                      or any(Path(d).exists() for d in info["dirs"])):
        time.sleep(0.5)
    assert not [p for p in info["pids"] if ray_cluster.pid_alive(p)]
    assert not any(Path(d).exists() for d in info["dirs"]) and not Path(info["state"]).exists()
