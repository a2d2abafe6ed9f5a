"""``webcurate filter`` and ``webcurate score``.

Options come from the parameter models (``quality_params``); each command
imports its stage when it runs, so ``webcurate --help`` stays fast.
"""
from __future__ import annotations

import click

from webcurate.shards.params import click_options, from_cli

from .quality_params import FilterParams, ScoreParams
from .cli import report_option, write_stage_report

_INPUT = click.option("--input", "input_uri", required=True, help="Dataset folder or s3:// prefix.")
_WORKERS = click.option("--workers", type=int, default=None, help="Shards at once (default: one per Ray CPU).")


@click.command("filter")
@_INPUT
@click_options(FilterParams)
@_WORKERS
@report_option
def filter_cmd(input_uri, workers, make_report, **kw):
    """Quality filters: score every image once, then keep or drop each sample with its reason.

    The scores go to DATASET/quality (blur, brightness, contrast, entropy,
    noise, colorfulness, JPEG blockiness, upscaling, size, caption features),
    computed once; the decisions to DATASET/filter (key, keep, reason). A
    re-run with other thresholds decodes nothing. Later stages (dedup,
    retrieve, cluster, sample, export) leave filtered samples out. A
    threshold left empty (null) in YAML, or named in --skip, is off.

    \b
    Examples:
      webcurate filter --input data/web
      webcurate filter --input data/web --min-blur 50 --skip aspect --min-score aesthetic=0.5
    """
    from .filter import run_filter

    params = from_cli(FilterParams, kw)
    res = run_filter(input_uri, params, workers=workers)
    c = res["counts"]
    click.echo(f"filter: kept {c.get('kept', 0)} of {c.get('total', 0)} samples "
               f"({res['removed_share']:.1%} removed)")
    write_stage_report(input_uri, make_report)


@click.command("score")
@_INPUT
@click_options(ScoreParams)
@_WORKERS
def score_cmd(input_uri, workers, **kw):
    """Score every sample with a model you bring (aesthetic, NSFW, watermark...) into DATASET/score_NAME.

    A timm classifier (--model + --weights), a linear head on a backbone's
    features (--model + --weights/--checkpoint + --head), or a linear head on
    the dataset's own embeddings (--head alone). Weights come from local or
    s3:// files only; nothing is downloaded. `webcurate filter --min-score
    NAME=V` and `webcurate sample --min-score/--weight-by NAME` use the score.

    \b
    Examples:
      webcurate score --input data/web --model resnet18 --weights nsfw.safetensors --output 1
      webcurate score --input data/web --head aesthetic_head.safetensors --name aesthetic
    """
    from .score import run_score

    params = from_cli(ScoreParams, kw)
    res = run_score(input_uri, params, workers=workers)
    c = res["counts"]
    click.echo(f"score {res['name']}: {c.get('ok', 0)} of {c.get('total', 0)} samples scored "
               f"({res['outputs']} output(s)) -> {input_uri}/{res['stage']}")


COMMANDS = [filter_cmd, score_cmd]
