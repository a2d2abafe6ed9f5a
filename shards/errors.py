"""Every error a user can act on, importable without the heavy reading stack.

Stages in every folder raise these; the CLI shows them as one line: the
``USER_ERRORS`` (bad input) exit 2, a ``RunError`` (a run that stopped part-way
and says what was kept) exits 1.
"""
from __future__ import annotations


class DatasetError(RuntimeError):
    """A dataset is missing, malformed, or lacks what a stage needs."""


class StorageError(RuntimeError):
    """An I/O failure with the URI it concerned, safe to show a user."""


class InputError(ValueError):
    """The input list or folder cannot be used; the message says why."""


class ConfigError(ValueError):
    """A config file or option is invalid."""


class RunError(RuntimeError):
    """A run failed part-way with a message that says what was kept and how to continue
    (failed shards after retries, a training run that stopped): one line, exit 1."""


USER_ERRORS: tuple[type[BaseException], ...] = (DatasetError, StorageError, ConfigError, InputError, FileNotFoundError)
