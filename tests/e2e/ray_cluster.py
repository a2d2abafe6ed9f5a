"""A real multi-node Ray cluster on 127.0.0.1 for tests, started with ``ray start``.

``local_ray_cluster()`` starts a head (``ray start --head``, optionally with the
dashboard and its Job Submission API) and ``num_nodes - 1`` worker nodes
(``ray start --address``), each with its own ``--temp-dir``, its own CPUs and a
custom resource naming it, all on the loopback address, and stops exactly what
it started.

Why not ``ray stop``: it kills every Ray process of the machine, including
other people's tests. Each node is started in its own session (process group)
with a marker variable in its environment; Ray's daemons stay in that group,
while Ray's worker processes and job drivers start sessions of their own but
inherit the marker. A node is stopped by signalling its group and every process
whose ``/proc/<pid>/environ`` carries its marker, and nothing else.

Ray advertises the machine's own IP for its nodes (it replaces 127.0.0.1 on a
multi-node cluster) and binds its GCS on all interfaces, so ``address`` is
given as ``127.0.0.1:<port>``; the dashboard binds to 127.0.0.1 only. Auth is
Ray's token mode with a token made for this cluster (``cluster.env()`` carries
it), so it neither depends on nor touches ``~/.ray/auth_token``.

Use it from a test (``--import-mode=importlib``: test folders are not packages,
so load it by path with ``tests/helpers.py``)::

    from helpers import load_helper
    ray_cluster = load_helper(pathlib.Path(__file__).parent / "ray_cluster.py")

    with ray_cluster.local_ray_cluster(num_nodes=2) as cluster:
        subprocess.run([...], env=cluster.env())      # drivers get RAY_ADDRESS
        cluster.kill_worker()                          # SIGKILL worker node 1
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

# Reads node states from the GCS, polling until the wanted states or the timeout.
_NODE_QUERY = r"""
import json, sys, time
from ray._raylet import GcsClient
from ray.core.generated import gcs_pb2
a = json.loads(sys.argv[1])
names = {gcs_pb2.GcsNodeInfo.ALIVE: "ALIVE", gcs_pb2.GcsNodeInfo.DEAD: "DEAD"}
deadline = time.time() + a["timeout"]
client = None
while True:
    states = {}
    try:
        client = client or GcsClient(address=a["address"])
        infos = client.get_all_node_info(timeout=10)
        states = {i.temp_dir.rstrip("/"): names.get(i.state, str(i.state)) for i in infos.values()}
    except Exception as e:  # the GCS may still be starting
        client = None
        states = {"error": repr(e)}
    ok = all(states.get(t) == "ALIVE" for t in a["alive"]) and all(states.get(t, "DEAD") == "DEAD" for t in a["dead"])
    if ok and "error" not in states:
        print(json.dumps(states)); sys.exit(0)
    if time.time() > deadline:
        print(json.dumps(states)); sys.exit(1)
    time.sleep(0.3)
"""

# Inherited by every process a node spawns; lets stop() find them all, and only them.
_NODE_MARKER = "WEBCURATE_TEST_RAY_NODE"

# A watchdog per cluster, in a session of its own: when the process that started
# the cluster dies without stopping it (a test run killed by a timeout, SIGKILL),
# it kills the nodes' process groups and every process whose environment names
# one of the nodes, and deletes their temp dirs. argv: the state file listing
# the nodes' temp dirs and process groups.
_REAPER = r"""
import json, os, shutil, signal, sys, time
state, parent = sys.argv[1], os.getppid()
while os.getppid() == parent:
    if not os.path.exists(state):
        sys.exit(0)  # stopped normally
    time.sleep(0.5)
try:
    info = json.load(open(state))
    dirs, groups = info["temp_dirs"], info["pgids"]
except Exception:
    sys.exit(0)
needles = [("WEBCURATE_TEST_RAY_NODE=" + d).encode() for d in dirs]
for _ in range(5):
    left = 0
    for g in groups:  # daemons that renamed themselves (setproctitle) may have lost the marker
        try:
            os.killpg(g, signal.SIGKILL)
            left += 1
        except OSError:
            pass
    for e in os.scandir("/proc"):
        if not e.name.isdigit() or int(e.name) == os.getpid():
            continue
        try:
            env = open(f"/proc/{e.name}/environ", "rb").read()
        except OSError:
            continue
        if any(n in env for n in needles):
            left += 1
            try:
                os.kill(int(e.name), signal.SIGKILL)
            except OSError:
                pass
    if not left:
        break
    time.sleep(0.5)
for d in dirs:
    shutil.rmtree(d, ignore_errors=True)
os.unlink(state)
"""

# Health checks sized for tests: the GCS declares a SIGKILLed node dead in about
# 3 s instead of ~30 s, so retries of its tasks start quickly.
_FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    # A loaded 2-core machine can take over the default 10 s to register a raylet.
    "RAY_raylet_start_wait_time_s": "180",
}


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now and was not handed out before by
    this process: the kernel may give a just-released port again, and `ray start`
    refuses two of its components on one port."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _ray_exe() -> str:
    exe = Path(sys.executable).parent / "ray"
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def _proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids_in_group(pgid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        # Fields after the ")" that ends the command name: state ppid pgrp ...
        rest = stat[stat.rfind(")") + 2:].split()
        if len(rest) > 2 and int(rest[2]) == pgid and rest[0] != "Z":
            pids.append(int(entry.name))
    return pids


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


def _pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line or environment contains ``text``."""
    out = []
    needle = text.encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or entry.name == str(os.getpid()) or not pid_alive(int(entry.name)):
            continue
        if text in _proc_cmdline(int(entry.name)):
            out.append(int(entry.name))
            continue
        try:
            if needle in Path(f"/proc/{entry.name}/environ").read_bytes():
                out.append(int(entry.name))
        except OSError:
            continue
    return out


@dataclass
class RayNode:
    """One ``ray start`` of the cluster: its name, custom resource, temp dir and process group."""

    name: str
    resource: str
    temp_dir: Path
    pgid: int
    num_cpus: int
    log_path: Path
    killed: bool = False

    @property
    def marker(self) -> str:
        """``NAME=VALUE`` set in the environment of every process of this node (workers included)."""
        return f"{_NODE_MARKER}={self.temp_dir}"

    def pids(self) -> list[int]:
        """Live processes of this node: its process group, plus Ray workers (which start
        their own sessions) and job drivers, found by the node's marker variable."""
        group = [] if self.killed else _pids_in_group(self.pgid)  # a dead group's id may be reused
        return sorted(set(group) | set(_pids_mentioning(self.marker)))

    def owns(self, pid: int) -> bool:
        """Whether process ``pid`` belongs to this node."""
        return pid in self.pids()

    def alive(self) -> bool:
        return bool(self.pids())

    def _signal(self, sig: int) -> None:
        if not self.killed:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, sig)
        for pid in _pids_mentioning(self.marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def kill(self, sig: int = signal.SIGKILL, grace_s: float = 5.0) -> None:
        """Signal every process of the node, escalate to SIGKILL after ``grace_s``, wait until gone."""
        self._signal(sig)
        deadline = time.time() + grace_s
        while time.time() < deadline and self.pids():
            time.sleep(0.2)
        for _ in range(10):
            if not self.pids():
                break
            self._signal(signal.SIGKILL)
            time.sleep(0.3)
        self.killed = True


@dataclass
class LocalRayCluster:
    """A running local cluster: GCS ``address`` (host:port), ``dashboard_url`` and its nodes."""

    address: str
    dashboard_url: str | None
    nodes: list[RayNode] = field(default_factory=list)
    base_env: dict[str, str] = field(default_factory=dict)
    object_store_bytes: int = 100 * 1024 * 1024
    state_file: Path | None = None
    reaper: subprocess.Popen | None = None

    def _record_nodes(self) -> None:
        """Tell the watchdog which nodes to clean up should this process die."""
        if self.state_file is not None:
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"temp_dirs": [str(n.temp_dir) for n in self.nodes],
                                       # a killed node's group id may be reused by then
                                       "pgids": [n.pgid for n in self.nodes if not n.killed]}))
            tmp.replace(self.state_file)

    def _add_node(self, node: "RayNode") -> None:
        self.nodes.append(node)
        self._record_nodes()

    @property
    def head(self) -> RayNode:
        return self.nodes[0]

    @property
    def workers(self) -> list[RayNode]:
        return self.nodes[1:]

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a driver subprocess (``python``, ``webcurate``) joining this cluster."""
        env = dict(self.base_env)
        env["RAY_ADDRESS"] = self.address
        if self.dashboard_url:
            env["RAY_API_SERVER_ADDRESS"] = self.dashboard_url
        env.update(extra)
        return env

    def node_states(self) -> dict[str, str]:
        """``{temp_dir: "ALIVE" | "DEAD"}`` for every node the GCS knows, read from the GCS."""
        return self._query_nodes([], [], timeout_s=0.0)

    def wait_nodes(
        self, alive: "list[RayNode]", dead: "list[RayNode] | tuple" = (), timeout_s: float = 90.0
    ) -> None:
        """Block until the GCS reports the ``alive`` nodes ALIVE and the ``dead`` ones DEAD."""
        self._query_nodes([str(n.temp_dir) for n in alive], [str(n.temp_dir) for n in dead], timeout_s)

    def _query_nodes(self, alive: list[str], dead: list[str], timeout_s: float) -> dict[str, str]:
        # A separate interpreter with this cluster's auth settings: the test process may
        # hold its own in-process Ray whose token/auth mode must not leak into this query.
        args = json.dumps({"address": self.address, "alive": alive, "dead": dead, "timeout": timeout_s})
        proc = subprocess.run(
            [sys.executable, "-c", _NODE_QUERY, args], env=self.env(), capture_output=True, text=True,
            timeout=timeout_s + 60,
        )
        if proc.returncode != 0:
            raise TimeoutError(f"cluster nodes did not reach the expected states: {proc.stdout[-2000:]}"
                               f"{proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def add_worker(self, num_cpus: int = 1, resources: dict[str, float] | None = None) -> RayNode:
        """Start one more worker node (``ray start --address``) and wait until the GCS has it."""
        i = len(self.nodes)
        node = _start_node(
            name=f"worker{i}", resource=f"wc_node{i}", head_address=self.address, num_cpus=num_cpus,
            resources=resources, env=self.base_env, object_store_bytes=self.object_store_bytes,
        )
        self._add_node(node)
        self.wait_nodes(alive=[node])
        return node

    def kill_worker(self, index: int = 0, wait_dead: bool = True, timeout_s: float = 60.0) -> RayNode:
        """SIGKILL every process of worker ``index`` (a node crash); by default wait until the GCS marks it DEAD."""
        node = self.workers[index]
        node.kill(signal.SIGKILL, grace_s=2.0)
        self._record_nodes()
        if wait_dead:
            self.wait_nodes(alive=[], dead=[node], timeout_s=timeout_s)
        return node

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop workers then the head (SIGTERM, SIGKILL after ``grace_s``) and delete the temp dirs.

        A short grace: Ray's daemons take seconds to honour SIGTERM, and a test
        cluster has nothing to flush that its deleted temp dir would keep.
        """
        for node in reversed(self.nodes):
            node.kill(signal.SIGTERM, grace_s=grace_s)
        for node in self.nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        if self.state_file is not None:
            self.state_file.unlink(missing_ok=True)  # the watchdog exits on its own
        if self.reaper is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.reaper.wait(timeout=5)
            if self.reaper.poll() is None:
                self.reaper.kill()
                self.reaper.wait()


def _spawn_node(
    *, name: str, resource: str, num_cpus: int, env: dict[str, str], object_store_bytes: int,
    head_address: str | None = None, dashboard_port: int | None = None, gcs_port: int | None = None,
    resources: dict[str, float] | None = None,
) -> tuple[RayNode, subprocess.Popen]:
    """Launch ``ray start`` for one node (without waiting); returns the node and the ``ray start`` process."""
    # A short path: Ray's unix sockets live under it and must stay < 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix=f"wcray-{name}-", dir="/tmp"))
    res = {resource: 1.0, **(resources or {})}
    args = [
        _ray_exe(), "start", f"--num-cpus={num_cpus}", "--num-gpus=0", f"--resources={json.dumps(res)}",
        f"--temp-dir={temp_dir}", f"--object-store-memory={object_store_bytes}", "--disable-usage-stats",
        # Every port explicit or random, never Ray's fixed defaults (52365, 10001, 10002-19999),
        # so several clusters (other people's tests) can share this machine.
        f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        "--min-worker-port=0", "--max-worker-port=0",
    ]
    node_env = dict(env)
    node_env[_NODE_MARKER] = str(temp_dir)
    if head_address is None:
        args += ["--head", f"--port={gcs_port}", f"--ray-client-server-port={free_port()}"]
        if dashboard_port:
            args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
        else:
            args += ["--include-dashboard=false"]
    else:
        args += [f"--address={head_address}"]
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "wb") as log:
        # Its own session: the node's daemons share this process group.
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=node_env, start_new_session=True)
    node = RayNode(name=name, resource=resource, temp_dir=temp_dir, pgid=proc.pid, num_cpus=num_cpus,
                   log_path=log_path)
    return node, proc


def _finish_node(node: RayNode, proc: subprocess.Popen, timeout_s: float = 180) -> RayNode:
    """Wait for ``ray start`` to return; on failure kill the node and raise with its output."""
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        rc = None
    if rc != 0:
        text = node.log_path.read_text(errors="replace")[-3000:]
        node.kill(signal.SIGKILL, grace_s=1.0)
        shutil.rmtree(node.temp_dir, ignore_errors=True)
        raise RuntimeError(f"`ray start` for {node.name} failed (rc={rc}):\n{text}")
    return node


def _start_node(**kwargs) -> RayNode:
    return _finish_node(*_spawn_node(**kwargs))


def _wait_port(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    """Until 127.0.0.1:``port`` accepts connections (or ``proc`` has exited)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)


def _wait_http(url: str, timeout_s: float, token: str | None = None) -> None:
    deadline = time.time() + timeout_s
    last: Exception | None = None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
                if r.status == 200:
                    return
        except Exception as e:  # not listening yet
            last = e
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout_s}s: {last}")


@contextlib.contextmanager
def local_ray_cluster(
    num_nodes: int = 2,
    cpus_per_node: int = 1,
    dashboard: bool = True,
    object_store_mb: int = 100,
    extra_env: dict[str, str] | None = None,
    worker_resources: dict[str, float] | None = None,
) -> Iterator[LocalRayCluster]:
    """Start a ``num_nodes``-node Ray cluster on 127.0.0.1; yield it; stop exactly what was started.

    Node ``i`` has ``cpus_per_node`` CPUs and the custom resource ``wc_node{i}``
    (1.0), so a task can be pinned with ``.options(resources={"wc_node1": 0.01})``;
    worker nodes also get ``worker_resources``. With ``dashboard`` the head serves
    the dashboard and the Job Submission API at ``cluster.dashboard_url``.
    ``extra_env`` is added to every node's environment (e.g. AWS_ENDPOINT_URL),
    on top of the current environment with this interpreter's ``bin`` first on PATH
    (job entrypoints run ``python``/``webcurate`` from there).
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Never let a RAY_ADDRESS from the caller redirect `ray start` or the drivers.
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(k, None)
    env.update(_FAST_FAILURE_DETECTION)
    # Token auth with a token of this cluster's own: Ray 2.5x+ turns auth on when
    # ~/.ray/auth_token exists, a file other local Ray users may create or replace.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.update(extra_env or {})
    gcs_port = free_port()
    dash_port = free_port() if dashboard else None
    cluster = LocalRayCluster(
        address=f"127.0.0.1:{gcs_port}",
        dashboard_url=f"http://127.0.0.1:{dash_port}" if dash_port else None,
        base_env=env, object_store_bytes=object_store_mb * 1024 * 1024,
    )
    fd, state = tempfile.mkstemp(prefix="wcray-cluster-", suffix=".json", dir="/tmp")
    os.close(fd)
    cluster.state_file = Path(state)
    cluster._record_nodes()
    cluster.reaper = subprocess.Popen([sys.executable, "-c", _REAPER, state], start_new_session=True,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        head, head_proc = _spawn_node(
            name="head", resource="wc_node0", num_cpus=cpus_per_node, env=env, gcs_port=gcs_port,
            dashboard_port=dash_port, object_store_bytes=cluster.object_store_bytes,
        )
        cluster._add_node(head)
        # Workers start as soon as the GCS answers, while the head's `ray start`
        # still brings up its raylet and dashboard: the two overlap.
        _wait_port(gcs_port, head_proc, timeout_s=120)
        spawned = []
        for i in range(1, num_nodes):
            node, proc = _spawn_node(
                name=f"worker{i}", resource=f"wc_node{i}", head_address=cluster.address, num_cpus=cpus_per_node,
                resources=worker_resources, env=env, object_store_bytes=cluster.object_store_bytes,
            )
            cluster._add_node(node)
            spawned.append((node, proc))
        _finish_node(head, head_proc)
        for node, proc in spawned:
            _finish_node(node, proc)
        cluster.wait_nodes(alive=cluster.nodes)
        if cluster.dashboard_url:
            _wait_http(f"{cluster.dashboard_url}/api/version", timeout_s=120, token=env["RAY_AUTH_TOKEN"])
        yield cluster
    finally:
        cluster.stop()
