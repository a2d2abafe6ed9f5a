"""CLI: ``webcurate embed | dedup | retrieve | cluster | sample | export | report | curate``.

Every option comes from the stage's parameter model (``stage_params.py``):
the same names, types, defaults and help as the ``curate`` YAML sections.
Only click and pydantic are imported here; each command imports its stage
when it runs, so ``webcurate --help`` stays fast.
"""
from __future__ import annotations

from typing import Any, Callable

import click

from webcurate.shards.params import click_options, from_cli

from .stage_params import (ClusterParams, DedupParams, EmbedParams, ExportParams, RetrieveParams, SampleParams,
                           TaskResources)


def report_option(f: Callable) -> Callable:
    """Add ``--report/--no-report`` (default on) to a curation command."""
    return click.option("--report/--no-report", "make_report", default=True, show_default=True,
                        help="Write the dataset's HTML report (DATASET/report.html) at the end and say where.")(f)


def input_option(help_: str) -> Callable[[Callable], Callable]:
    return click.option("--input", "input_uri", required=True, metavar="DATASET", help=help_)


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


def _options(model, kw: dict[str, Any]) -> dict[str, Any]:
    return from_cli(model, kw).model_dump()


@click.command("embed")
@input_option("Dataset folder or s3:// prefix to embed (made by `webcurate shard`).")
@click_options(EmbedParams)
def embed(input_uri: str, **kw: Any) -> None:
    """Embed every image with a timm backbone into DATASET/embeddings/ (L2-normalised).

    Resumable: shards already embedded with the same model and weights are
    skipped. Undecodable images (and zero/constant vectors) are recorded with
    status=failed. Ends with the embedding health (do the vectors separate
    images?) and a copy-threshold calibration for `dedup --threshold auto`.
    """
    from .embed import run_embed

    run_embed(input_uri, **_options(EmbedParams, kw))


@click.command("dedup")
@input_option("Dataset to deduplicate (with embeddings unless --method exact).")
@click_options(DedupParams)
@click_options(TaskResources)
@report_option
def dedup(input_uri: str, make_report: bool, **kw: Any) -> None:
    """Decide which samples to keep; writes DATASET/dedup/ (keep, duplicate_of, similarity, reason).

    Runs as Ray tasks over the embedding parts; refuses (before writing
    anything) to remove more than --max-removal of the pool unless
    --allow-mass-removal is given, and shows why.
    """
    from .dedup import run_dedup

    run_dedup(input_uri, resources=from_cli(TaskResources, kw), **_options(DedupParams, kw))
    write_stage_report(input_uri, make_report)


@click.command("retrieve")
@input_option("The pool dataset to select from.")
@click_options(RetrieveParams, required=["seeds"])
@click_options(TaskResources)
@report_option
def retrieve(input_uri: str, make_report: bool, **kw: Any) -> None:
    """Select pool samples near seed datasets; writes DATASET/retrieve/ (selected, score, seed_key)."""
    from .retrieve import run_retrieve

    result = run_retrieve(input_uri, resources=from_cli(TaskResources, kw), **_options(RetrieveParams, kw))
    if result.message:
        click.echo(f"note: {result.message}", err=True)
    write_stage_report(input_uri, make_report)


@click.command("cluster")
@input_option("Dataset folder or s3:// prefix with an `embeddings` table.")
@click_options(ClusterParams)
@click_options(TaskResources, exclude=["num_gpus"])
@report_option
def cluster(input_uri: str, make_report: bool, **kw: Any) -> None:
    """Hierarchical k-means with resampling over the dataset's embeddings.

    Writes the `clusters` table (key, status, level_1..level_L, distance to
    the level-1 centroid) and the centroids of every level under
    DATASET/clusters/. Re-running with the same options does nothing.

    \b
    Example:
      webcurate cluster --input s3://bucket/web --levels 10000,1000,100
    """
    from .cluster import run_cluster

    run_cluster(input_uri, resources=from_cli(TaskResources, kw), **_options(ClusterParams, kw))
    write_stage_report(input_uri, make_report)


@click.command("sample")
@input_option("Dataset folder or s3:// prefix with a `clusters` table.")
@click_options(SampleParams)
@click_options(TaskResources, exclude=["num_gpus"])
@report_option
def sample(input_uri: str, make_report: bool, **kw: Any) -> None:
    """Balanced sampling: water-fill --target over the cluster hierarchy.

    Top-down, each cluster's share is split over its child clusters so that
    small clusters are kept whole and large ones are cut to a common cap.
    Writes the `sample` table (key, selected).

    \b
    Example:
      webcurate sample --input data/web --target 100000
    """
    from .sample import run_sample

    run_sample(input_uri, resources=from_cli(TaskResources, kw), **_options(SampleParams, kw))
    write_stage_report(input_uri, make_report)


@click.command("export")
@input_option("The curated dataset (folder or s3:// prefix).")
@click.option("--output", required=True, help="Where to write the new dataset (folder or s3:// prefix).")
@click_options(ExportParams)
@report_option
def export(input_uri: str, output: str, make_report: bool, **kw: Any) -> None:
    """Copy the selected samples into a new dataset (bytes copied, not re-encoded).

    Cluster ids, dedup decisions and retrieval scores are merged into each
    sample's json and index row; the new manifest names its parent.

    \b
    Example:
      webcurate export --input data/web --output s3://bucket/web-curated
    """
    from .export_selection import run_export

    res = run_export(input_uri, output, **_options(ExportParams, kw))
    click.echo(f"exported {res.info['exported']} samples ({res.info['selection']} selection) to {output}")
    write_stage_report(output, make_report)


@click.command("report")
@click.argument("dataset")
@click.option("--output", default=None, help="HTML file to write (local or s3://); default DATASET/report.html.")
def report(dataset: str, output: str | None) -> None:
    """Write a self-contained HTML report of DATASET.

    Counts, cluster grids (largest first), cluster sizes before/after
    balancing, duplicate groups and retrieval hits next to their seeds, with
    images inlined, for whichever of these stages have run.
    """
    from .report import write_report

    click.echo(f"report: {write_report(dataset, output)}")


@click.command("curate")
@click.option("--config", "config", required=True,
              help="YAML file (local or s3://) with input, output and one section per step; "
                   "see docs/examples/curate.yaml.")
@click.option("--quiet", is_flag=True, help="Only the final summary table.")
def curate(config: str, quiet: bool) -> None:
    """Run embed -> filter -> dedup -> retrieve -> cluster -> sample -> export and the report.

    Every parameter is checked before any work starts. Each step is skipped
    when its output is already complete with the same parameters, and
    resumes where it stopped otherwise; re-run the same command after an
    interruption.
    """
    from .curate import run_curate

    run_curate(config, verbose=not quiet)


COMMANDS = [embed, dedup, retrieve, cluster, sample, export, report, curate]
