"""`webcurate cluster | sample | export | report | curate`.

Only click is imported here; each command imports its stage when it runs,
so `webcurate --help` stays fast.
"""
from __future__ import annotations

import click

from .stage_report import report_option, write_stage_report


@click.command("cluster")
@click.option("--input", "input_uri", required=True, help="Dataset folder or s3:// prefix with an `embeddings` table.")
@click.option("--levels", default="10000,1000,100", show_default=True,
              help="k per level, finest first: level 1 clusters the samples, level t clusters level t-1's "
                   "centroids. A k larger than what it clusters is lowered to that, with a warning.")
@click.option("--resampling-steps", default="10", show_default=True,
              help="Resampling steps per level (re-run k-means on the points closest to each centroid, then "
                   "re-assign). One number applies to every level (level 1 is skipped when it is large); "
                   "a list like 0,10,10 sets each level.")
@click.option("--sample-size", default="auto", show_default=True,
              help="Points taken per cluster in a resampling step: a number, a list per level, or auto "
                   "(half the mean cluster size of the level).")
@click.option("--resample-strategy", type=click.Choice(["closest", "random"]), default="closest", show_default=True,
              help="Which points of a cluster a resampling step takes.")
@click.option("--subset", type=click.Choice(["auto", "all", "dedup", "retrieve"]), default="auto", show_default=True,
              help="Which samples to cluster: the retrieved ones, the dedup survivors, or all embedded ones; "
                   "auto takes the latest of these that exists.")
@click.option("--niter", default=20, show_default=True, help="Lloyd iterations of each k-means.")
@click.option("--method", type=click.Choice(["auto", "flat", "split"]), default="auto", show_default=True,
              help="Level-1 k-means: flat (one faiss k-means), split (coarse cells split in proportion to "
                   "their size, then global refinement; for millions of points x thousands of clusters), "
                   "or auto by problem size.")
@click.option("--seed", default=0, show_default=True, help="Random seed: the same seed gives the same clusters.")
@report_option
def cluster(input_uri, levels, resampling_steps, sample_size, resample_strategy, subset, niter, method, seed,
            make_report):
    """Hierarchical k-means with resampling over the dataset's embeddings.

    Writes the `clusters` table (key, status, level_1..level_L, distance to
    the level-1 centroid) and the centroids of every level under
    DATASET/clusters/. Re-running with the same options does nothing.

    \b
    Example:
      webcurate cluster --input s3://bucket/web --levels 10000,1000,100
    """
    from .cluster import run_cluster

    run_cluster(input_uri, levels=levels, resampling_steps=resampling_steps, sample_size=sample_size,
                sample_strategy=resample_strategy, niter=niter, seed=seed, method=method, subset=subset)
    write_stage_report(input_uri, make_report)


@click.command("sample")
@click.option("--input", "input_uri", required=True, help="Dataset folder or s3:// prefix with a `clusters` table.")
@click.option("--target", required=True, type=int, help="How many samples to select (all of them if fewer exist).")
@click.option("--strategy", type=click.Choice(["random", "closest"]), default="random", show_default=True,
              help="Within a level-1 cluster take random samples, or those closest to the centroid.")
@click.option("--seed", default=0, show_default=True, help="Random seed for ties and the random strategy.")
@click.option("--min-score", multiple=True, metavar="NAME=VALUE",
              help="Leave out samples whose `webcurate score --name NAME` score is below VALUE (repeatable).")
@click.option("--weight-by", default=None, metavar="NAME",
              help="Within each cluster, draw with probability growing with score NAME (replaces --strategy).")
@report_option
def sample(input_uri, target, strategy, seed, min_score, weight_by, make_report):
    """Balanced sampling: water-fill --target over the cluster hierarchy.

    Top-down, each cluster's share is split over its child clusters so that
    small clusters are kept whole and large ones are cut to a common cap.
    Writes the `sample` table (key, selected).

    \b
    Example:
      webcurate sample --input data/web --target 100000
    """
    from .sample import run_sample

    run_sample(input_uri, target, strategy=strategy, seed=seed, min_score=list(min_score), weight_by=weight_by)
    write_stage_report(input_uri, make_report)


@click.command("export")
@click.option("--input", "input_uri", required=True, help="The curated dataset (folder or s3:// prefix).")
@click.option("--output", required=True, help="Where to write the new dataset (folder or s3:// prefix).")
@click.option("--selection", type=click.Choice(["auto", "sample", "retrieve", "dedup"]), default="auto",
              show_default=True,
              help="Which selection to export; auto takes the latest: sample, else retrieve, else dedup survivors.")
@click.option("--workers", default=None, type=int, help="Shards copied at once (default: one per Ray CPU).")
@report_option
def export(input_uri, output, selection, workers, make_report):
    """Copy the selected samples into a new dataset (bytes copied, not re-encoded).

    Cluster ids, dedup decisions and retrieval scores are merged into each
    sample's json and index row; the new manifest names its parent.

    \b
    Example:
      webcurate export --input data/web --output s3://bucket/web-curated
    """
    from .export import run_export

    res = run_export(input_uri, output, selection=selection, workers=workers)
    click.echo(f"exported {res['exported']} samples ({res['selection']} selection) to {res['output']}")
    write_stage_report(res["output"], make_report)


@click.command("report")
@click.argument("dataset")
@click.option("--output", default=None, help="HTML file to write (local or s3://); default DATASET/report.html.")
def report(dataset, output):
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
def curate(config, quiet):
    """Run embed -> dedup -> retrieve -> cluster -> sample -> export and the report.

    Each step is skipped when its output is already complete with the same
    parameters, and resumes where it stopped otherwise; re-run the same
    command after an interruption.
    """
    from .curate import run_curate

    run_curate(config, verbose=not quiet)


COMMANDS = [cluster, sample, export, report, curate]
