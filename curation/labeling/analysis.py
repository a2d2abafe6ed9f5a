"""LF analysis: polarity, coverage, overlaps, conflicts, dev-set accuracy.

Definitions follow Snorkel's ``LFAnalysis`` so numbers compare:

- polarity: the classes an LF voted at least once;
- coverage: fraction of items it votes on;
- overlaps: fraction of items where it votes and some other LF votes too;
- conflicts: fraction of items where it votes and some other LF votes a
  different class;
- with a labelled dev set: correct / incorrect votes and empirical accuracy
  (correct / votes) on the dev items.

The label model adds what it learned without labels: each LF's accuracy and
the LF it was found to depend on (copy).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from webcurate.shards.errors import ConfigError

from .lf import ABSTAIN


@dataclass
class LFStats:
    """One LF's row of the analysis table (dev/model fields None when unknown)."""

    name: str
    polarity: list[str]
    coverage: float
    overlaps: float
    conflicts: float
    votes: int
    errors: int = 0
    correct: int | None = None
    incorrect: int | None = None
    emp_accuracy: float | None = None
    learned_accuracy: float | None = None
    depends_on: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lf_stats(
    L: np.ndarray,
    lf_names: Sequence[str],
    classes: Sequence[str],
    *,
    L_dev: np.ndarray | None = None,
    y_dev: np.ndarray | None = None,
    model: Any = None,
    errors: dict[str, int] | None = None,
) -> list[LFStats]:
    """Per-LF statistics of label matrix ``L`` (n, m); dev accuracy from
    ``L_dev`` (n_dev, m) with true classes ``y_dev`` (n_dev,) (-1 = unknown)."""
    L = np.asarray(L)
    n, m = L.shape
    K = len(classes)
    voted = L != ABSTAIN
    nvotes = voted.sum(axis=1)
    counts = np.zeros((n, K), dtype=np.int32)
    for c in range(K):
        counts[:, c] = (L == c).sum(axis=1)
    learned = model.lf_accuracies() if model is not None and hasattr(model, "lf_accuracies") else None
    parents = getattr(model, "parents", None) if model is not None else None
    rows = []
    for j, name in enumerate(lf_names):
        v = voted[:, j]
        nv = int(v.sum())
        lj = L[v, j].astype(np.int64)
        overl = int((nvotes[v] > 1).sum())
        # others voting a different class = all votes - votes for this LF's class
        confl = int((nvotes[v] - counts[np.nonzero(v)[0], lj] > 0).sum()) if nv else 0
        row = LFStats(
            name=name, polarity=[classes[c] for c in sorted(set(lj.tolist()))],
            coverage=nv / n if n else 0.0, overlaps=overl / n if n else 0.0, conflicts=confl / n if n else 0.0,
            votes=nv, errors=int((errors or {}).get(name, 0)),
        )
        if L_dev is not None and y_dev is not None:
            known = (np.asarray(y_dev) >= 0) & (np.asarray(L_dev)[:, j] != ABSTAIN)
            row.correct = int((np.asarray(L_dev)[known, j] == np.asarray(y_dev)[known]).sum())
            row.incorrect = int(known.sum()) - row.correct
            row.emp_accuracy = row.correct / known.sum() if known.sum() else None
        if learned is not None and nv:
            row.learned_accuracy = float(learned[j])
        if parents is not None and parents[j] >= 0:
            row.depends_on = lf_names[parents[j]]
        rows.append(row)
    return rows


def dev_labels(labels: Sequence[str | None], classes: Sequence[str], *, where: str = "dev dataset",
               field: str = "label", none_label: str | None = None) -> np.ndarray:
    """Class names of a labelled dev set -> (n,) indices (-1 where unlabelled or ``none_label``,
    the mark of "none of these" examples, which only open-set rejection uses).

    Raises ``ConfigError`` naming the field and the unknown names.
    """
    index = {c: i for i, c in enumerate(classes)}
    if none_label is not None and none_label not in index:  # a class may be called "none"
        labels = [None if x == none_label else x for x in labels]
    unknown = sorted({x for x in labels if x is not None and x not in index})
    if unknown:
        raise ConfigError(f"{where}: field `{field}` has class names not in the class list {list(classes)}: "
                          f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    y = np.array([index[x] if x is not None else -1 for x in labels], dtype=np.int64)
    if len(y) and not np.any(y >= 0):
        raise ConfigError(f"{where}: no sample has a `{field}`; a dev set must be labelled")
    return y


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3f}"
    if isinstance(x, list):
        return ",".join(x) if len(x) <= 4 else f"{len(x)} classes"
    return str(x)


def print_lf_table(rows: Sequence[LFStats], title: str = "LF analysis") -> None:
    """The analysis as a table on stdout (dev/model columns only when known).

    Drawn with rich directly, wide enough that LF names and headers are
    never cut (the shared ``print_table`` is fixed at 120 columns).
    """
    from rich.console import Console
    from rich.table import Table

    cols = ["name", "polarity", "coverage", "overlaps", "conflicts", "errors"]
    if any(r.emp_accuracy is not None or r.correct is not None for r in rows):
        cols += ["correct", "incorrect", "emp_accuracy"]
    if any(r.learned_accuracy is not None for r in rows):
        cols += ["learned_accuracy"]
    if any(r.depends_on for r in rows):
        cols += ["depends_on"]
    table = Table(title=title, title_justify="left")
    for c in cols:
        table.add_column(c, justify="left" if c in ("name", "polarity", "depends_on") else "right", no_wrap=True)
    for r in rows:
        table.add_row(*[_fmt(getattr(r, c)) for c in cols])
    width = sum(max(len(c), *(len(_fmt(getattr(r, c))) for r in rows)) + 3 for c in cols) + 1 if rows else 80
    Console(width=max(120, width)).print(table)
