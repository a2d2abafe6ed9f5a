"""Shared fixtures: a real S3 endpoint on loopback, a local Ray, test images.

Everything here is a real component: ``moto_server`` runs as its own process
bound to 127.0.0.1 (DALI's S3 reader needs a separate process), Ray starts
in-process once per test session with a small object store.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

os.environ.setdefault("WEBCURATE_QUIET", "1")
# faiss/OpenMP threads spin while idle by default: on 2 shared cores that made
# k-means 10x slower. Must be set before faiss loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# Tests are not a package: helpers import the shared photo recipe as ``photos``.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from photos import jpeg_bytes, make_photo  # noqa: E402,F401 - shared with the test helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto's server) on 127.0.0.1; yields its URL.

    Sets AWS_ENDPOINT_URL and dummy credentials for boto3, pyarrow and DALI
    for the whole session, and stops the server at the end.
    """
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in
             ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1",
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    from webcurate.shards import storage

    storage._boto_client.cache_clear()
    storage._s3fs.cache_clear()
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage._boto_client.cache_clear()
    storage._s3fs.cache_clear()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the loopback S3 server; yields ``s3://<bucket>``."""
    from webcurate.shards import storage

    name = f"test-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One in-process Ray for the test session (2 CPUs, small object store).

    Depends on ``s3_server`` so the S3 endpoint settings exist before Ray
    starts: its worker processes inherit the environment of that moment.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=400 * 1024 * 1024,
                 ignore_reinit_error=True, log_to_driver=False)
    yield ray
    # Left running on purpose: later tests reuse it; Ray stops at interpreter exit.


@pytest.fixture
def image_folder(tmp_path):
    """An ImageFolder tree with 3 classes x 4 JPEGs; returns its path."""
    root = tmp_path / "images"
    for c, cls in enumerate(["cat", "dog", "fish"]):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(4):
            (d / f"{i:03d}.jpg").write_bytes(jpeg_bytes(make_photo(100 * c + i)))
    return root
