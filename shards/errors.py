"""Errors about datasets, importable without the heavy reading stack."""
from __future__ import annotations


class DatasetError(RuntimeError):
    """A dataset is missing, malformed, or lacks what a stage needs."""
