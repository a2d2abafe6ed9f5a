"""The parameters of `webcurate shard`, declared once (CLI options and the `shard:` section of `webcurate run`).

Both validate through ``IngestParams`` before any work starts, so
``image_size: big`` or ``retries: 'two'`` is a one-line error naming the
field, never a run whose every row failed with a ``TypeError``.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .download import USER_AGENT, FetchOptions
from .image_ops import ImageOptions
from .params import Params

RESIZE = Literal["none", "keep_ratio", "center_crop", "border"]


class IngestParams(Params):
    """Inputs, image handling, fetching, politeness and what a run may read."""

    input: str = Field(description="A folder of images (local or s3://), a URL list (.parquet/.csv/.tsv/.jsonl/.txt, "
                                   "optionally .gz), or with --adopt an existing WebDataset folder.")
    output: str | None = Field(None, description="Dataset folder or s3:// prefix to write (not needed with --adopt).")
    adopt: bool = Field(False, description="Index an existing WebDataset folder (e.g. img2dataset output) in place.")
    append: bool = Field(False, description="Add a URL list's new URLs to an existing --output as new shards; URLs "
                                            "already in it are reported, not fetched again.")
    retry_failed: str | None = Field(None, description="Re-fetch failed rows of completed shards whose reason is in "
                                                       "this comma list (default: timeout,connection_error,http_5xx,"
                                                       "http_429) and rewrite those shards.")
    url_col: str = Field("url", description="URL column of a URL list.")
    caption_col: str | None = Field("caption", description="Caption column of a URL list (if present).")
    label_col: str | None = Field(None, description="Label column of a URL list (class name per row).")
    labels_from_dirs: bool = Field(False, description="Folder input: the first directory level is the class label.")
    shard_size: int = Field(1000, ge=1, description="Samples per output shard.")
    workers: int | None = Field(None, ge=1, description="Shards processed at once (default: one per Ray CPU).")
    threads: int = Field(16, ge=1, le=1024, description="Download/decode threads inside each shard task.")
    image_size: int = Field(256, ge=1, description="Target size for --resize-mode.")
    resize_mode: RESIZE = Field("keep_ratio", description="keep_ratio: shorter side to --image-size; center_crop: "
                                "then a centred square; border: fit in a square and pad; none: keep size.")
    upscale: bool = Field(False, description="Also enlarge images smaller than --image-size.")
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality of re-encoded images.")
    format: Literal["jpg", "png", "webp"] = Field("jpg", description="Format of re-encoded images.")
    min_side: int = Field(16, ge=1, description="Reject images whose shorter side is smaller.")
    max_pixels: int = Field(89_478_485, ge=1, description="Reject larger images from their header, before "
                                                          "decoding (decompression bombs).")
    max_task_pixels: int = Field(2 * 89_478_485, ge=1, description="Decoded pixels one shard task holds at once "
                                                                   "over all its threads.")
    max_aspect_ratio: float = Field(10.0, gt=0, description="Reject images more elongated than this.")
    timeout: float = Field(10.0, gt=0, description="HTTP read timeout (s); the connect timeout is half of it.")
    total_timeout: float = Field(30.0, gt=0, description="Max seconds for one download: connect, headers and body.")
    retries: int = Field(2, ge=0, le=20, description="Retries for 5xx/429, connection errors and connect timeouts.")
    max_bytes: int = Field(32 * 1024 * 1024, ge=1, description="Cap on one download's (or local file's) size.")
    user_agent: str | None = Field(None, description="HTTP User-Agent (default names webcurate); X-Robots-Tag "
                                                     "directives scoped to its first token apply.")
    dedup: bool = Field(True, description="Drop exact duplicates (same decoded pixels); --no-dedup keeps them.")
    host_concurrency: int = Field(32, ge=0, description="Requests in flight per host for the whole run, shared by "
                                                        "the shard tasks running at once (at least 1 each; 0: no cap).")
    host_rate: float = Field(0.0, ge=0, description="Requests per second per host for the whole run, shared by the "
                                                    "shard tasks running at once (0: no limit).")
    max_retry_after: float = Field(60.0, ge=0, description="Longest Retry-After (s) honoured; a longer one fails "
                                                           "the sample with its status (see --retry-failed).")
    allow_private_addresses: bool = Field(False, description="Also fetch from loopback and private-range hosts "
                                          "(on-prem mirrors). Link-local addresses such as cloud metadata "
                                          "(169.254.169.254) are refused always.")
    allow_local_files: bool = Field(False, description="Let a URL list name local files (file:// or absolute paths).")
    allow_s3_sources: bool = Field(False, description="Let a URL list name s3:// objects in any bucket.")
    s3_source_bucket: list[str] = Field(default_factory=list, description="Let a URL list name s3:// objects in "
                                                                          "this bucket (repeatable).")

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _output_unless_adopt(self) -> "IngestParams":
        if self.adopt:
            if self.output and self.output.rstrip("/") != self.input.rstrip("/"):
                raise ValueError("--adopt indexes the input in place; leave out output (or make it equal input)")
            if self.append or self.retry_failed:
                raise ValueError("--adopt cannot be combined with --append or --retry-failed")
        elif not self.output:
            raise ValueError("output is required (unless adopt)")
        if self.append and self.retry_failed:
            raise ValueError("--append and --retry-failed are separate runs; give one of them")
        return self

    def image_options(self) -> ImageOptions:
        return ImageOptions(image_size=self.image_size, resize_mode=self.resize_mode, min_side=self.min_side,
                            max_pixels=self.max_pixels, max_aspect_ratio=self.max_aspect_ratio,
                            jpeg_quality=self.quality, output_format=self.format, upscale=self.upscale,
                            max_task_pixels=self.max_task_pixels)

    def fetch_options(self) -> FetchOptions:
        """Fetch options for the whole run (``ingest_table`` gives each task its share of the host limits)."""
        return FetchOptions(connect_timeout=max(1.0, self.timeout / 2), read_timeout=self.timeout,
                            total_timeout=self.total_timeout, retries=self.retries, max_bytes=self.max_bytes,
                            user_agent=self.user_agent or USER_AGENT, host_concurrency=self.host_concurrency,
                            host_rate=self.host_rate, max_retry_after=self.max_retry_after,
                            allow_private_addresses=self.allow_private_addresses,
                            allow_local_files=self.allow_local_files, allow_s3_sources=self.allow_s3_sources,
                            s3_source_buckets=tuple(self.s3_source_bucket))

    def ingest_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``ingest.ingest`` (everything but input and output)."""
        return dict(url_col=self.url_col, caption_col=self.caption_col, label_col=self.label_col,
                    labels_from_dirs=self.labels_from_dirs, shard_size=self.shard_size, workers=self.workers,
                    threads=self.threads, image_opts=self.image_options(), fetch_opts=self.fetch_options(),
                    dedup=self.dedup)
