"""``webcurate label``, ``webcurate lf-analysis`` and ``webcurate selftrain`` (click only at import time).

The options come from the parameter models in ``params.py`` (one declaration
for the CLI, the ``webcurate run`` sections and the Python API).
"""
from __future__ import annotations

import click

from webcurate.shards.params import click_options, from_cli

from .params import EXPORT_ONLY, LabelParams


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


COMMANDS = [label, lf_analysis]
