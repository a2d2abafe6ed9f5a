"""Fixtures for the labelling tests: small datasets made by datagen.py."""
from __future__ import annotations

import importlib.util
import os

import pytest

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("labeling_datagen", os.path.join(_here, "datagen.py"))
datagen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(datagen)


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
