"""Fixtures of the training tests: a tiny sharded dataset made by the real ingest."""
from __future__ import annotations

import importlib.util
import os

import pytest


def _helpers():
    spec = importlib.util.spec_from_file_location("train_data", os.path.join(os.path.dirname(__file__), "train_data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def train_helpers():
    """The helpers module ``tests/train/train_data.py`` (TINY overrides, image_tree)."""
    return _helpers()


@pytest.fixture
def tiny_dataset(tmp_path, ray_local, train_helpers):
    """24 JPEGs (3 classes) ingested into 3 local shards; returns the dataset root."""
    from webcurate.shards.ingest import ingest_folder

    src = train_helpers.image_tree(str(tmp_path / "images"))
    root = str(tmp_path / "dataset")
    ingest_folder(src, root, shard_size=8, labels_from_dirs=True, summary=False)
    return root
