"""Loading the helper modules that live beside the tests.

pytest runs with ``--import-mode=importlib`` and tests/ is not a package, so a
helper such as ``curation/cluster_data.py`` cannot be imported by name; each is
loaded once by file path and registered in ``sys.modules`` (dataclasses need
their module there, and every test file then shares one copy of the module).
``tests/conftest.py`` puts this folder on ``sys.path``, hence ``from helpers import load_helper``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

TESTS = os.path.dirname(os.path.abspath(__file__))


def load_helper(path: str | os.PathLike) -> ModuleType:
    """The module at ``path`` (a ``.py`` file under tests/), loaded on first use."""
    path = os.path.abspath(path)
    name = "webcurate_tests_" + os.path.splitext(os.path.relpath(path, TESTS))[0].replace(os.sep, "_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod
