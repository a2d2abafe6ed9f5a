"""The import rule of docs/architecture.md, checked on the source: pipeline -> curation | train -> shards.

Every ``import webcurate.X`` / ``from webcurate.X`` (at module level or inside a
function) is read with ``ast``; a dependency that points up, or between
curation and train, means the piece lives in the wrong folder.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# What each top-level folder may import from the webcurate namespace.
ALLOWED = {
    "shards": {"shards"},
    "curation": {"curation", "shards"},
    "train": {"train", "shards"},
    "pipeline": {"pipeline", "curation", "train", "shards"},
}


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "webcurate" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
    return out


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_point_only_down_the_layers(folder):
    wrong = [f"{p.relative_to(REPO)}:{line} imports webcurate.{target}"
             for p in sorted((REPO / folder).rglob("*.py"))
             for line, target in _imports(p) if target not in ALLOWED[folder]]
    assert not wrong, "\n".join(wrong)


def test_every_source_file_stays_small():
    big = [f"{p.relative_to(REPO)}: {n} lines" for folder in ALLOWED
           for p in sorted((REPO / folder).rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > 500]
    assert not big, "\n".join(big)
