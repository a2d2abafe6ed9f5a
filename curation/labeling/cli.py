"""``webcurate label`` and ``webcurate lf-analysis`` (click only at import time)."""
from __future__ import annotations

import click


def _split(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _floats(value: str | None) -> list[float] | None:
    parts = _split(value)
    if parts is None:
        return None
    try:
        return [float(v) for v in parts]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


_common = [
    click.option("--input", "input_uri", required=True, metavar="DATASET",
                 help="Dataset to label (folder or s3:// prefix). Its LF votes are stored in <DATASET>/lf_votes/."),
    click.option("--lfs", "lfs_path", required=True, metavar="FILE",
                 help="Python file defining labelling functions (@labeling_function, Snorkel's, or factory LFs; "
                      "LFS = [...] to pick them) and optionally CLASSES = [...]."),
    click.option("--dev", "dev_uri", default=None, metavar="DEV_DATASET",
                 help="Labelled dataset (`label` = class name) for empirical LF accuracy and calibration."),
    click.option("--classes", default=None, metavar="A,B,C",
                 help="Class names, in class-index order (else `classes:` of --config, else CLASSES in the LF file)."),
    click.option("--config", default=None, metavar="YAML", help="Config file whose `classes:` list names the classes."),
    click.option("--max-lf-error-rate", default=0.5, show_default=True, type=click.FloatRange(0, 1),
                 help="Stop when an LF raises on more than this fraction of samples (1 = never stop; failed "
                      "samples always count as abstains)."),
    click.option("--sidecars", default=None, metavar="STAGE,...",
                 help="Sidecar tables merged into each record (default: embeddings,clusters,retrieve when present); "
                      "columns of other stages appear as <stage>_<column>."),
    click.option("--workers", default=None, type=int, help="Shard tasks in flight (default: Ray's CPUs)."),
]


def _with_common(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


@click.command("label")
@_with_common
@click.option("--output", "output_uri", required=True, metavar="URI",
              help="Where to write the pseudo-labelled dataset (+ pseudo_labels.parquet, label_model.json).")
@click.option("--model", type=click.Choice(["labelmodel", "majority", "auto"]), default="labelmodel",
              show_default=True,
              help="labelmodel: learns LF accuracies and LF copies without labels; majority: majority vote "
                   "(ties to the more frequent class); auto: whichever is more accurate on --dev.")
@click.option("--min-confidence", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Export only samples whose label probability is at least this.")
@click.option("--per-class-cap", default=None, type=click.IntRange(min=0),
              help="Export at most this many samples per class (the most confident ones).")
@click.option("--class-balance", default=None, metavar="P1,P2,...",
              help="Known class proportions (in class order); estimated from the votes when omitted.")
def label(input_uri, lfs_path, dev_uri, classes, config, max_lf_error_rate, sidecars, workers, output_uri, model,
          min_confidence, per_class_cap, class_balance):
    """Weak labelling: apply labelling functions over a dataset's shards (Ray),
    fit a label model on their votes, and export a pseudo-labelled dataset
    whose samples carry label, label_prob, label_confidence and label_sources."""
    from .workflow import run_label

    run_label(input_uri, lfs_path, output_uri, dev_uri=dev_uri, classes=_split(classes), config=config,
              model=model, min_confidence=min_confidence, per_class_cap=per_class_cap,
              class_balance=_floats(class_balance), max_error_rate=max_lf_error_rate, sidecars=_split(sidecars),
              workers=workers)


@click.command("lf-analysis")
@_with_common
def lf_analysis(input_uri, lfs_path, dev_uri, classes, config, max_lf_error_rate, sidecars, workers):
    """Apply labelling functions and print their polarity, coverage, overlaps,
    conflicts, learned accuracy and LF copies (and, with --dev, empirical
    accuracy) without exporting anything."""
    from .workflow import run_label

    run_label(input_uri, lfs_path, None, dev_uri=dev_uri, classes=_split(classes), config=config,
              max_error_rate=max_lf_error_rate, sidecars=_split(sidecars), workers=workers)


COMMANDS = [label, lf_analysis]
