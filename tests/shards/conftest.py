"""Fixtures for the shards tests: the loopback image server and image generators.

The helper modules live beside this file and are loaded by path (pytest runs
with --import-mode=importlib and tests/ is not a package).
"""
from __future__ import annotations

import os

import pytest

from helpers import load_helper

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str):
    return load_helper(os.path.join(HERE, f"{name}.py"))


@pytest.fixture(scope="session")
def imagegen():
    """The ``imagegen`` helper module (deterministic good and bad images)."""
    return _load("imagegen")


@pytest.fixture(scope="session")
def http_server_mod():
    """The ``http_server`` helper module (``ImageServer``, ``BAD_CASES``)."""
    return _load("http_server")


@pytest.fixture
def image_server(http_server_mod):
    """A started ``ImageServer`` on 127.0.0.1 with fast drip/hang settings; stopped after the test."""
    with http_server_mod.ImageServer(drip_interval=0.2, hang_seconds=120) as srv:
        yield srv


@pytest.fixture
def faulty_s3(s3_bucket, s3_server):
    """``(proxy, bucket)``: the storage layer talks to the test S3 server through a
    fault-injecting proxy (``s3_fault_proxy.FaultProxy``); add ``Fault``s to it."""
    from webcurate.shards import storage

    with _load("s3_fault_proxy").FaultProxy(s3_server) as proxy:
        saved = os.environ["AWS_ENDPOINT_URL"]
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        storage._boto_client.cache_clear()
        storage._s3fs.cache_clear()
        try:
            yield proxy, s3_bucket
        finally:
            os.environ["AWS_ENDPOINT_URL"] = saved
            storage._boto_client.cache_clear()
            storage._s3fs.cache_clear()


@pytest.fixture(scope="session")
def s3_fault():
    """The ``Fault`` rule class of the S3 fault proxy."""
    return _load("s3_fault_proxy").Fault
