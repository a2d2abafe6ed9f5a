"""Fixtures of the training tests: a tiny sharded dataset made by the real ingest."""
from __future__ import annotations

import os

import pytest

from helpers import load_helper


@pytest.fixture(scope="session")
def train_helpers():
    """The helpers module ``tests/train/train_data.py`` (TINY overrides, image_tree)."""
    return load_helper(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_data.py"))


@pytest.fixture
def tiny_dataset(tmp_path, ray_local, train_helpers):
    """24 JPEGs (3 classes) ingested into 3 local shards; returns the dataset root."""
    from webcurate.shards.ingest import ingest_folder

    src = train_helpers.image_tree(str(tmp_path / "images"))
    root = str(tmp_path / "dataset")
    ingest_folder(src, root, shard_size=8, labels_from_dirs=True, summary=False)
    return root
