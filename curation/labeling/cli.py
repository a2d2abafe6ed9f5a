"""``webcurate label``, ``webcurate lf-analysis`` and ``webcurate selftrain`` (click only at import time).

The options come from the parameter models in ``params.py`` (one declaration
for the CLI, the ``webcurate run`` sections and the Python API).
"""
from __future__ import annotations

import click

from webcurate.shards.params import click_options, from_cli

from .params import EXPORT_ONLY, LabelParams, SelfTrainParams


@click.command("label")
@click_options(LabelParams, required=("output",))
def label(**kw) -> None:
    """Weak labelling: apply labelling functions over a dataset's shards (Ray),
    fit a label model on their votes, and export a pseudo-labelled dataset
    whose samples carry label, label_prob, label_confidence and label_sources."""
    from .workflow import label_dataset

    label_dataset(from_cli(LabelParams, kw))


@click.command("lf-analysis")
@click_options(LabelParams, exclude=EXPORT_ONLY)
def lf_analysis(**kw) -> None:
    """Apply labelling functions and print their polarity, coverage, overlaps,
    conflicts, learned accuracy and LF copies (and, with --dev, empirical
    accuracy) without exporting anything."""
    from .workflow import label_dataset

    label_dataset(from_cli(LabelParams, kw))


@click.command("selftrain")
@click_options(SelfTrainParams, required=("output",))
def selftrain(**kw) -> None:
    """Self-training on frozen embeddings: fit a class-balanced classifier on
    the labelled seeds, add the pool's confident predictions as pseudo-labels,
    refit, for a few rounds (resumable per round); calibrate on --dev, leave
    samples that belong to no class unlabelled (novelty score, --abstain-below),
    and export a pseudo-labelled dataset in `webcurate label`'s format
    (label_sources = selftrain:round_<r>). CPU only; needs `webcurate embed`
    on the input, the seeds and the dev set with one model."""
    from .selftrain_stage import run_selftrain

    run_selftrain(from_cli(SelfTrainParams, kw))


COMMANDS = [label, lf_analysis, selftrain]
