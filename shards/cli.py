"""`webcurate shard`: build a dataset from images, a URL list, or adopt existing tars."""
from __future__ import annotations

import click

from .ingest_params import IngestParams
from .params import click_options, from_cli

DEFAULT_RETRY_REASONS = "timeout,connection_error,http_5xx,http_429"


@click.command("shard")
@click_options(IngestParams, exclude=("retry_failed",), required=("input",))
@click.option("--retry-failed", "retry_failed", is_flag=False, flag_value=DEFAULT_RETRY_REASONS, default=None,
              metavar="[REASONS]",
              help="Re-fetch the failed rows of completed shards whose reason is in REASONS (comma list; "
                   f"without a value: {DEFAULT_RETRY_REASONS}) and rewrite those shards atomically.")
def shard(**kwargs):
    """Shard raw images into WebDataset tars + parquet index + manifest.

    One Ray task per output shard (local Ray by default, a cluster via
    RAY_ADDRESS). Every input ends as exactly one index row: ok, or a failure
    with its reason. Re-running the same command resumes: complete shards
    are skipped and the output is byte-identical.

    URL lists are untrusted: only http(s) sources, and only public addresses,
    unless --allow-local-files / --allow-s3-sources / --s3-source-bucket /
    --allow-private-addresses say otherwise.

    \b
    Examples:
      webcurate shard --input photos/ --output data/photos --labels-from-dirs
      webcurate shard --input urls.parquet --output s3://bucket/web --caption-col text
      webcurate shard --input more-urls.parquet --output s3://bucket/web --append
      webcurate shard --input urls.parquet --output s3://bucket/web --retry-failed timeout,http_5xx
      webcurate shard --input img2dataset_out/ --adopt
    """
    from .ingest import run_ingest

    params = from_cli(IngestParams, kwargs)
    click.echo(run_ingest(params))


COMMANDS = [shard]
