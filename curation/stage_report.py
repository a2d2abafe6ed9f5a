"""The HTML report at the end of each curation command (`--report/--no-report`).

Only click is imported at module level, like the CLI modules that use it.
"""
from __future__ import annotations

from typing import Callable

import click


def report_option(f: Callable) -> Callable:
    """Add ``--report/--no-report`` (default on) to a curation command."""
    return click.option(
        "--report/--no-report", "make_report", default=True, show_default=True,
        help="Write the dataset's HTML report (DATASET/report.html) at the end and print where it is.",
    )(f)


def write_stage_report(dataset: str, enabled: bool) -> str | None:
    """Write ``dataset``'s report when ``enabled``; returns its URI.

    A report that cannot be written is a warning, not a failure: the stage's
    output is already complete and recorded by then.
    """
    if not enabled:
        return None
    from .report import write_report

    try:
        uri = write_report(dataset)
    except Exception as e:  # noqa: BLE001 - the stage succeeded; say why the page is missing
        click.echo(f"warning: report not written ({type(e).__name__}: {e})", err=True)
        return None
    click.echo(f"report: {uri}")
    return uri
