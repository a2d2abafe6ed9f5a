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
    counts = result.counts
    n = counts.get(rate_key, 0)
    shards = f"{len(result.done)} / {len(result.skipped)} / {len(result.failed)}"
    if totals is None:
        rows: list[tuple[Any, ...]] = [(k, v) for k, v in counts.items()]
        rows.append(("shards done / skipped / failed", shards))
        rows.append(("seconds", f"{result.seconds:.1f}"))
        if result.seconds > 0 and n:
            rows.append((f"{rate_key}/s", f"{n / result.seconds:.1f}"))
        print_table(title, rows, ("what", "count"))
        return
    keys = list(totals) + [k for k in counts if k not in totals]
    rows = [(k, counts.get(k, 0), totals.get(k, 0)) for k in keys]
    rows.append(("shards done / skipped / failed", shards, ""))
    rows.append(("seconds", f"{result.seconds:.1f}", ""))
    if result.seconds > 0:
        for key in dict.fromkeys((rate_key, "ok")):
            if counts.get(key):
                rows.append((f"{key}/s", f"{counts[key] / result.seconds:.1f}", ""))
    print_table(title, rows, ("what", "this run", "dataset"))
