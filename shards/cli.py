"""`webcurate shard`: build a dataset from images, a URL list, or adopt existing tars."""
from __future__ import annotations

import click


@click.command("shard")
@click.option("--input", "input_uri", required=True,
              help="A folder of images (local or s3://), a URL list (.parquet/.csv/.tsv/.jsonl/.txt, "
                   "optionally .gz), or with --adopt an existing WebDataset folder.")
@click.option("--output", default=None, help="Dataset folder or s3:// prefix to write (not needed with --adopt).")
@click.option("--url-col", default="url", show_default=True, help="URL column of a URL list.")
@click.option("--caption-col", default="caption", show_default=True, help="Caption column of a URL list (if present).")
@click.option("--label-col", default=None, help="Label column of a URL list (class name per row).")
@click.option("--labels-from-dirs", is_flag=True, help="Folder input: the first directory level is the class label.")
@click.option("--adopt", is_flag=True, help="Index an existing WebDataset folder (e.g. img2dataset output) in place.")
@click.option("--shard-size", default=1000, show_default=True, help="Samples per output shard.")
@click.option("--workers", default=None, type=int, help="Shards processed at once (default: one per Ray CPU).")
@click.option("--threads", default=16, show_default=True, help="Download/decode threads inside each shard task.")
@click.option("--image-size", default=256, show_default=True, help="Target size for --resize-mode.")
@click.option("--resize-mode", type=click.Choice(["none", "keep_ratio", "center_crop", "border"]),
              default="keep_ratio", show_default=True,
              help="keep_ratio: shorter side to --image-size; center_crop: then a centred square; "
                   "border: fit in a square and pad; none: keep size.")
@click.option("--upscale", is_flag=True, help="Also enlarge images smaller than --image-size.")
@click.option("--quality", default=95, show_default=True, help="JPEG/WebP quality of re-encoded images.")
@click.option("--format", "output_format", type=click.Choice(["jpg", "png", "webp"]), default="jpg", show_default=True)
@click.option("--min-side", default=16, show_default=True, help="Reject images whose shorter side is smaller.")
@click.option("--max-pixels", default=89_478_485, show_default=True,
              help="Reject larger images from their header, before decoding (decompression bombs).")
@click.option("--max-aspect-ratio", default=10.0, show_default=True, help="Reject images more elongated than this.")
@click.option("--timeout", default=10.0, show_default=True, help="HTTP read timeout (s); connect timeout is half.")
@click.option("--total-timeout", default=30.0, show_default=True, help="Max seconds for one whole download.")
@click.option("--retries", default=2, show_default=True, help="Retries for 5xx/429/connection errors, with backoff.")
@click.option("--max-bytes", default=32 * 1024 * 1024, show_default=True, help="Cap on one download's size.")
@click.option("--user-agent", default=None, help="HTTP User-Agent (default names webcurate).")
@click.option("--no-dedup", is_flag=True, help="Keep exact duplicates (same decoded pixels) as separate samples.")
@click.option("--allow-private-addresses", is_flag=True,
              help="Also fetch from loopback and private-range hosts (on-prem mirrors). Link-local "
                   "addresses such as cloud metadata (169.254.169.254) are refused always.")
@click.option("--allow-local-files", is_flag=True, help="Let a URL list name local files (file:// or absolute paths).")
@click.option("--allow-s3-sources", is_flag=True, help="Let a URL list name s3:// objects in any bucket.")
@click.option("--s3-source-bucket", "s3_source_buckets", multiple=True,
              help="Let a URL list name s3:// objects in this bucket (repeatable).")
def shard(input_uri, output, url_col, caption_col, label_col, labels_from_dirs, adopt, shard_size, workers, threads,
          image_size, resize_mode, upscale, quality, output_format, min_side, max_pixels, max_aspect_ratio,
          timeout, total_timeout, retries, max_bytes, user_agent, no_dedup, allow_private_addresses,
          allow_local_files, allow_s3_sources, s3_source_buckets):
    """Shard raw images into WebDataset tars + parquet index + manifest.

    One Ray task per output shard (local Ray by default, a cluster via
    RAY_ADDRESS). Every input ends as exactly one index row: ok, or a failure
    with its reason. Re-running the same command resumes: complete shards
    are skipped and the output is byte-identical.

    \b
    Examples:
      webcurate shard --input photos/ --output data/photos --labels-from-dirs
      webcurate shard --input urls.parquet --output s3://bucket/web --caption-col text
      webcurate shard --input img2dataset_out/ --adopt
    """
    from webcurate.shards.download import USER_AGENT, FetchOptions
    from webcurate.shards.image_ops import ImageOptions

    if adopt:
        from webcurate.shards.adopt import adopt as adopt_fn

        if output and output.rstrip("/") != input_uri.rstrip("/"):
            raise click.UsageError("--adopt indexes the input in place; leave out --output (or make it equal --input)")
        ds = adopt_fn(input_uri, workers=workers)
        click.echo(f"adopted {ds.num_shards} shard(s) in place: {input_uri}")
        return
    if not output:
        raise click.UsageError("--output is required (unless --adopt)")
    from webcurate.shards.ingest import ingest

    image_opts = ImageOptions(image_size=image_size, resize_mode=resize_mode, min_side=min_side,
                              max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio,
                              jpeg_quality=quality, output_format=output_format, upscale=upscale)
    fetch_opts = FetchOptions(connect_timeout=max(1.0, timeout / 2), read_timeout=timeout,
                              total_timeout=total_timeout, retries=retries, max_bytes=max_bytes,
                              user_agent=user_agent or USER_AGENT, allow_private_addresses=allow_private_addresses,
                              allow_local_files=allow_local_files, allow_s3_sources=allow_s3_sources,
                              s3_source_buckets=tuple(s3_source_buckets))
    result = ingest(input_uri, output, url_col=url_col, caption_col=caption_col, label_col=label_col,
                    labels_from_dirs=labels_from_dirs, shard_size=shard_size, workers=workers, threads=threads,
                    image_opts=image_opts, fetch_opts=fetch_opts, dedup=not no_dedup)
    c = result.counts
    click.echo(f"wrote {result.num_shards} shard(s) to {output}: {c.get('ok', 0)} ok, "
               f"{c.get('failed', 0)} failed, {c.get('duplicate', 0)} duplicates, "
               f"{c.get('opted_out', 0)} opted out in {result.seconds:.1f}s")


COMMANDS = [shard]
