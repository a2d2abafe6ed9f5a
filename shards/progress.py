"""Progress bars and end-of-stage summary tables."""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable

from tqdm.auto import tqdm


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0) -> tqdm:
    """A tqdm bar on stderr; silent when WEBCURATE_QUIET=1."""
    return tqdm(
        total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
        disable=os.environ.get("WEBCURATE_QUIET") == "1", file=sys.stderr,
    )


def print_table(title: str, rows: Iterable[tuple[Any, ...]], headers: tuple[str, ...]) -> None:
    """A small rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for h in headers:
        table.add_column(str(h), justify="right" if h not in headers[:1] else "left")
    for r in rows:
        table.add_row(*[str(x) for x in r])
    Console(width=120).print(table)


def print_summary(result: Any, title: str, rate_key: str = "total", totals: dict[str, Any] | None = None) -> None:
    """Counts by outcome, shards done/skipped/failed and throughput of a stage.

    ``totals`` (the manifest's counts over every complete shard) adds a column for
    the whole dataset, so a resumed run still shows what the dataset holds.
    """
    counts = result.counts  # summed over shards on each access
    columns = [counts] if totals is None else [counts, totals]
    pad = ("",) * (len(columns) - 1)
    keys = dict.fromkeys([*(totals or {}), *counts])
    rows: list[tuple[Any, ...]] = [(k, *(c.get(k, 0) for c in columns)) for k in keys]
    rows.append(("shards done / skipped / failed",
                 f"{len(result.done)} / {len(result.skipped)} / {len(result.failed)}", *pad))
    rows.append(("seconds", f"{result.seconds:.1f}", *pad))
    rate_keys = (rate_key,) if totals is None else dict.fromkeys((rate_key, "ok"))
    for key in rate_keys:
        if result.seconds > 0 and counts.get(key):
            rows.append((f"{key}/s", f"{counts[key] / result.seconds:.1f}", *pad))
    print_table(title, rows, ("what", "count") if totals is None else ("what", "this run", "dataset"))
