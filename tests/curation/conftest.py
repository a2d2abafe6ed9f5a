"""Fixtures for the curation tests.

Fixtures of embed/dedup/retrieve are prefixed ``search_``; their helpers
live in ``search_data.py`` beside this file, loaded by path (pytest runs with
--import-mode=importlib and tests/ is not a package).
"""
from __future__ import annotations

import os
import shutil

import pytest

from helpers import load_helper

HERE = os.path.dirname(os.path.abspath(__file__))

# A tiny ConvNet whose random-init features already separate our planted
# near-duplicates (cosine >= 0.93) from unrelated test photos (<= 0.57).
SEARCH_MODEL = "convnext_atto"
SEARCH_IMAGE_SIZE = 64


@pytest.fixture(scope="session", autouse=True)
def _ray_after_s3(ray_local):
    """Every global stage runs as Ray tasks: start Ray once, after the S3 test endpoint is configured
    (its workers inherit the environment of that moment)."""
    yield ray_local


def _load_search_data():
    return load_helper(os.path.join(HERE, "search_data.py"))


@pytest.fixture(scope="session")
def search_data():
    """The ``search_data`` helper module (planted near-duplicate datasets)."""
    return _load_search_data()


def _embed(root: str):
    from webcurate.curation.embed import run_embed

    return run_embed(root, SEARCH_MODEL, random_init=True, image_size=SEARCH_IMAGE_SIZE, batch_size=32,
                     summary=False)


@pytest.fixture(scope="session")
def search_pool_base(tmp_path_factory, ray_local, search_data):
    """An embedded pool: 24 photos, 12 near-duplicates (quality/crop/resize), 2 exact
    copies, 1 undecodable file, in 3 shards of 16. Read-only: copy it (``search_pool``)."""
    root = str(tmp_path_factory.mktemp("search") / "pool")
    planted = search_data.planted_dataset(root, broken=1)
    planted.embed_result = _embed(root)
    return planted


@pytest.fixture(scope="session")
def search_seed(tmp_path_factory, ray_local, search_data):
    """An embedded seed/eval set: quality-55 re-encodes of pool photos 2, 4, 6, 8
    (keys s002..s008) plus 3 unrelated photos (u000..u002), in 2 shards."""
    root = str(tmp_path_factory.mktemp("search") / "seed")
    items = [search_data.Item(f"s{i:03d}", search_data.jpeg_bytes(search_data.make_photo(i), quality=55))
             for i in (2, 4, 6, 8)]
    items += [search_data.Item(f"u{i:03d}", search_data.jpeg_bytes(search_data.make_photo(1000 + i)))
              for i in range(3)]
    search_data.write_dataset(root, items, shard_size=4)
    _embed(root)
    return root


@pytest.fixture
def search_pool(search_pool_base, tmp_path):
    """A private copy of the embedded pool (stages write sidecars into it)."""
    import copy

    dst = str(tmp_path / "pool")
    shutil.copytree(search_pool_base.root, dst)
    planted = copy.copy(search_pool_base)
    planted.root = dst
    return planted
