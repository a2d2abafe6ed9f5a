"""`webcurate run PIPELINE.yaml` and `webcurate demo`."""
from __future__ import annotations

import click


@click.command("run")
@click.argument("config", metavar="PIPELINE.yaml")
@click.option("--only", multiple=True, type=click.Choice(["shard", "curate", "train", "embed_for_label", "label"]),
              help="Run only these steps (repeatable); the others are left as they are.")
def run(config: str, only: tuple[str, ...]) -> None:
    """Run shard -> curate -> train -> label from one config (local path or s3://).

    Each step takes the previous step's output as its input unless it names
    one, and is skipped or resumed when its output is already complete, so
    re-running after a failure continues where it stopped. See
    docs/examples/pipeline.yaml.
    """
    from .config_run import run_pipeline

    run_pipeline(config, only=list(only) or None)


@click.command("demo")
@click.option("--workdir", default="webcurate-demo", show_default=True,
              help="Where the corpus, datasets, run and report go (wiped first unless --keep).")
@click.option("--keep", is_flag=True, help="Keep an existing --workdir and resume in it.")
@click.option("--max-steps", default=30, show_default=True, help="Training steps of the tiny ViT.")
def demo(workdir: str, keep: bool, max_steps: int) -> None:
    """The whole flow on local Ray and local disk in a few minutes on a CPU.

    Builds a small web-like corpus of real photos, serves it on 127.0.0.1 as a
    URL list (with near-duplicates, distractors and broken links), then shards,
    curates, trains a tiny DINOv2/iBOT ViT, labels with labelling functions
    (checked on a held-out labelled dev set), and writes HTML reports. Prints
    where everything is and how many pseudo-labels match the hidden truth.
    """
    from .demo import run_demo

    run_demo(workdir, keep=keep, max_steps=max_steps)


COMMANDS = [run, demo]
