"""`webcurate submit/status/stop/logs` against a real Ray head with its Job API.

The cluster is a real `ray start --head` with the dashboard on 127.0.0.1
(tests/e2e/ray_cluster.py, token auth of its own), started once for this
module and stopped process by process at the end (never `ray stop`, which
would kill other people's Ray on this machine). Commands run as the real
`webcurate` executable in subprocesses, as a user would run them.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import load_helper
from webcurate.pipeline import jobs


WEBCURATE = str(Path(sys.executable).parent / "webcurate")
FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYTESTSECRET"


# ---------------------------------------------------------------- no cluster needed


def test_parse_env_copies_bare_names_from_local_env_and_rejects_bad_entries():
    local = {"AWS_SECRET_ACCESS_KEY": FAKE_SECRET}
    assert jobs.parse_env(["A=1", "B=x=y", "AWS_SECRET_ACCESS_KEY"], local) == {
        "A": "1", "B": "x=y", "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}
    with pytest.raises(jobs.JobsError, match="MISSING is not set"):
        jobs.parse_env(["MISSING"], local)
    with pytest.raises(jobs.JobsError, match="valid variable name"):
        jobs.parse_env(["=oops"], local)


def test_secret_names_cover_aws_credentials_and_tokens_but_not_region_or_endpoint():
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN",
                 "HF_TOKEN", "DB_PASSWORD", "OPENAI_API_KEY"):
        assert jobs.is_secret_name(name), name
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "RAY_ADDRESS", "OMP_NUM_THREADS"):
        assert not jobs.is_secret_name(name), name


def test_redactor_masks_secret_values_and_aws_key_patterns_even_split_across_chunks():
    r = jobs.Redactor.from_env({"AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_REGION": "eu-west-1"},
                               include_local=False)
    text = f"key AKIAABCDEFGHIJKLMNOP secret {FAKE_SECRET} in eu-west-1\naws_secret_access_key = other123\n"
    out = r(text)
    assert FAKE_SECRET not in out and "AKIAABCDEFGHIJKLMNOP" not in out and "other123" not in out
    assert "eu-west-1" in out  # configuration stays readable
    stream = jobs.LineRedactor(r)
    half = len(FAKE_SECRET) // 2
    pieces = [stream.feed(f"a {FAKE_SECRET[:half]}"), stream.feed(f"{FAKE_SECRET[half:]} b\nc"), stream.flush()]
    assert "".join(pieces) == "a *** b\nc"
    shown = r.runtime_env({"env_vars": {"AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_REGION": "eu-west-1"}})
    assert shown["env_vars"] == {"AWS_SECRET_ACCESS_KEY": "***", "AWS_REGION": "eu-west-1"}


def test_resolve_address_prefers_option_then_api_server_env_then_ray_address():
    env = {"RAY_API_SERVER_ADDRESS": "http://api:8265", "RAY_ADDRESS": "http://ray:8265"}
    assert jobs.resolve_address("http://opt:8265/", env) == "http://opt:8265"
    assert jobs.resolve_address(None, env) == "http://api:8265"
    assert jobs.resolve_address(None, {"RAY_ADDRESS": "head:8265"}) == "http://head:8265"
    assert jobs.resolve_address(None, {}) == jobs.DEFAULT_ADDRESS


def test_entrypoint_runs_shipped_webcurate_as_a_module_and_quotes_arguments():
    assert jobs.entrypoint_command(["webcurate", "curate", "--config", "a b.yaml"], ship_package=True) == \
        "python -m webcurate.pipeline.cli curate --config 'a b.yaml'"
    assert jobs.entrypoint_command(["webcurate", "--help"], ship_package=False) == "webcurate --help"
    with pytest.raises(jobs.JobsError, match="no command"):
        jobs.entrypoint_command([], ship_package=True)


def test_package_snapshot_is_an_importable_copy_of_the_sources_without_caches(tmp_path):
    root = jobs.package_snapshot(tmp_path)
    for rel in ("__init__.py", "pipeline/cli.py", "pipeline/jobs.py", "shards/storage.py"):
        assert (root / rel).is_file(), rel
    assert not list(root.rglob("*.pyc")) and not list(root.rglob("__pycache__"))
    # The copy shadows the installed package when put first on PYTHONPATH (as Ray's py_modules does).
    proc = subprocess.run(
        [sys.executable, "-c", "import webcurate.pipeline.jobs as j; print(j.__file__)"],
        env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(root / "pipeline" / "jobs.py")


def test_submit_refuses_a_command_line_holding_a_secret_before_contacting_any_cluster(monkeypatch):
    from click.testing import CliRunner

    from webcurate.pipeline.jobs_cli import submit

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    res = CliRunner().invoke(submit, ["--address", "http://127.0.0.1:9", "--", "echo", FAKE_SECRET])
    assert res.exit_code == 2
    assert "--env NAME" in res.output and FAKE_SECRET not in res.output


def test_submit_to_an_unreachable_address_fails_in_one_line_naming_it():
    import socket

    from click.testing import CliRunner

    from webcurate.pipeline.jobs_cli import submit

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    res = CliRunner().invoke(submit, ["--address", f"http://127.0.0.1:{port}", "--no-ship-package", "--", "true"])
    assert res.exit_code == 2, res.output
    assert f"cannot reach the Ray Job API at http://127.0.0.1:{port}" in res.output
    assert res.output.count("\n") == 1  # one line, no traceback


# ---------------------------------------------------------------- against a real head


@pytest.fixture(scope="module")
def head():
    rc = load_helper(Path(__file__).resolve().parents[1] / "e2e" / "ray_cluster.py")
    with rc.local_ray_cluster(num_nodes=1, cpus_per_node=1, dashboard=True) as cluster:
        yield cluster


def _wc(cluster, *args: str, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `webcurate` executable."""
    return subprocess.run([WEBCURATE, *args], env={**cluster.env(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def _jobs(cluster, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The same commands through the light entry point (no stage modules loaded: quicker)."""
    return subprocess.run([sys.executable, "-m", "webcurate.pipeline.jobs_cli", *args],
                          env={**cluster.env(), **(env or {})}, capture_output=True, text=True, timeout=180)


def _api(cluster, path: str):
    """The test's own look at the Job API (plain HTTP with the cluster token), for polling."""
    req = urllib.request.Request(f"{cluster.dashboard_url}{path}",
                                 headers={"Authorization": f"Bearer {cluster.env()['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_submit_streams_the_logs_prints_the_job_id_and_exits_with_the_job_status(head):
    ok = _wc(head, "submit", "--address", head.dashboard_url, "--no-ship-package", "--",
             "python", "-c", "print('hello from the job')")
    assert ok.returncode == 0, ok.stderr
    assert "hello from the job" in ok.stdout
    assert "raysubmit_" in ok.stderr and "SUCCEEDED" in ok.stderr

    bad = _jobs(head, "submit", "--address", head.dashboard_url, "--no-ship-package", "--",
              "python", "-c", "import sys; print('about to fail'); sys.exit(5)")
    assert bad.returncode == 1
    assert "about to fail" in bad.stdout
    assert "FAILED" in bad.stderr and "driver exit code 5" in bad.stderr


def test_submit_ships_this_webcurate_and_the_working_dir_and_redacts_credentials(head, tmp_path):
    # webcurate --help through the shipped package (no console script needed on the cluster).
    helped = _wc(head, "submit", "--", "webcurate", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "webcurate: raw web images" in helped.stdout
    assert "<webcurate package from this machine>" in helped.stderr

    # A script from the working dir reports which webcurate it imports and what it received.
    (tmp_path / "probe.py").write_text(
        "import hashlib, os, webcurate.pipeline.jobs as j\n"
        "print('module', j.__file__)\n"
        "print('cwd-has-probe', os.path.exists('probe.py'))\n"
        "s = os.environ['AWS_SECRET_ACCESS_KEY']\n"
        "print('secret', s)\n"
        "print('sha', hashlib.sha256(s.encode()).hexdigest())\n"
        "print('plain', os.environ['WC_PLAIN'])\n")
    proc = _wc(head, "submit", "--working-dir", str(tmp_path), "--env", "AWS_SECRET_ACCESS_KEY",
               "--env", "WC_PLAIN=visible-value", "--", "python", "probe.py",
               env={"AWS_SECRET_ACCESS_KEY": FAKE_SECRET})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert FAKE_SECRET not in out
    assert "secret ***" in proc.stdout
    assert f"sha {hashlib.sha256(FAKE_SECRET.encode()).hexdigest()}" in proc.stdout  # the job got it
    assert "plain visible-value" in proc.stdout
    assert "cwd-has-probe True" in proc.stdout
    module = next(line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("module "))
    assert not module.startswith(str(Path(jobs.__file__).parent)), module  # the shipped copy, not the checkout
    assert module.endswith("webcurate/pipeline/jobs.py")
    assert "'AWS_SECRET_ACCESS_KEY': '***'" in proc.stderr  # the runtime_env as printed

    job_id = next(w for w in proc.stderr.split() if w.startswith("raysubmit_"))
    st = _jobs(head, "status", job_id, "--json", env={"AWS_SECRET_ACCESS_KEY": "unrelated-local-value"})
    assert st.returncode == 0, st.stderr
    assert FAKE_SECRET not in st.stdout
    assert json.loads(st.stdout)["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "***"
    logs = _jobs(head, "logs", job_id, env={"AWS_SECRET_ACCESS_KEY": FAKE_SECRET})
    assert "secret ***" in logs.stdout and FAKE_SECRET not in logs.stdout


def test_no_wait_then_status_logs_and_stop_control_a_running_job(head):
    sub = _wc(head, "submit", "--no-wait", "--no-ship-package", "--",
              "python", "-u", "-c", "import time; print('started'); time.sleep(300)")
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    assert job_id.startswith("raysubmit_")

    deadline = time.time() + 90
    while time.time() < deadline:
        if (_api(head, f"/api/jobs/{job_id}")["status"] == "RUNNING"
                and "started" in _api(head, f"/api/jobs/{job_id}/logs")["logs"]):
            break
        time.sleep(0.5)
    assert json.loads(_jobs(head, "status", job_id, "--json").stdout)["status"] == "RUNNING"
    assert "started" in _jobs(head, "logs", job_id).stdout
    assert job_id in [j["job_id"] for j in json.loads(_jobs(head, "status", "--json").stdout)]

    stopped = _wc(head, "stop", job_id)
    assert stopped.returncode == 0, stopped.stderr
    assert f"job {job_id} STOPPED" in stopped.stdout
    assert _api(head, f"/api/jobs/{job_id}")["status"] == "STOPPED"
    again = _jobs(head, "stop", job_id)
    assert "was not running (STOPPED)" in again.stdout


def test_status_of_an_unknown_job_is_one_clear_line(head):
    proc = _jobs(head, "status", "raysubmit_doesnotexist")
    assert proc.returncode == 2
    assert "raysubmit_doesnotexist" in proc.stderr and "Traceback" not in proc.stderr
