"""Errors that mean "the user's input is wrong", shown as one line, not a traceback."""
from __future__ import annotations

from webcurate.shards.dataset import DatasetError
from webcurate.shards.storage import StorageError


class ConfigError(ValueError):
    """A config file or option is invalid."""


USER_ERRORS: tuple[type[BaseException], ...] = (DatasetError, StorageError, ConfigError, FileNotFoundError)
