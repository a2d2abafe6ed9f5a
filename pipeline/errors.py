"""Errors that mean "the user's input is wrong", shown as one line, not a traceback."""
from __future__ import annotations

from webcurate.shards.errors import DatasetError
from webcurate.shards.inputs import InputError
from webcurate.shards.storage import StorageError


class ConfigError(ValueError):
    """A config file or option is invalid."""


class RunError(RuntimeError):
    """A run failed part-way with a message that says what was kept and how to continue
    (failed shards after retries, a training run that stopped): one line, exit 1."""


USER_ERRORS: tuple[type[BaseException], ...] = (DatasetError, StorageError, ConfigError, InputError, FileNotFoundError)
