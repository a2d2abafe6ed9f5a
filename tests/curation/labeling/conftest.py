"""Fixtures for the labelling tests: small datasets made by datagen.py."""
from __future__ import annotations

import os

import pytest

from helpers import load_helper

datagen = load_helper(os.path.join(os.path.dirname(os.path.abspath(__file__)), "datagen.py"))


@pytest.fixture
def gen():
    """The datagen helper module (CLASSES, make_items, write_dataset)."""
    return datagen


@pytest.fixture
def pets(tmp_path):
    """An unlabelled dataset of 90 items in 3 shards, with embeddings; returns (root, items)."""
    items = datagen.make_items(90, seed=1)
    root = str(tmp_path / "pets")
    datagen.write_dataset(root, items, shard_size=30)
    return root, items
