"""Parameters of the labelling stages, declared once (``webcurate.shards.params``).

Each model feeds its command's click options (``click_options``), the
matching section of a ``webcurate run`` config (``label:``, ``selftrain:``)
and the Python API, and its validation errors name the field.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator

from webcurate.shards.params import Params

LABEL_MODELS = ("labelmodel", "majority", "auto")


def split_commas(value: Any) -> Any:
    """``"a,b"`` (one CLI option, as the commands always took lists) -> ``["a", "b"]``; lists pass through."""
    if isinstance(value, str):
        parts = [v.strip() for v in value.split(",") if v.strip()]
        return parts or None
    return value


class LabelParams(Params):
    """``webcurate label`` / ``lf-analysis`` and the ``label:`` step of ``webcurate run``."""

    input: str = Field(description="Dataset to label (folder or s3:// prefix). Its LF votes are stored in "
                                   "<DATASET>/lf_votes/.")
    lfs: str = Field(description="Python file defining labelling functions (@labeling_function, Snorkel's, or "
                                 "factory LFs; LFS = [...] to pick them) and optionally CLASSES = [...].")
    output: str | None = Field(None, description="Where to write the pseudo-labelled dataset (+ "
                                                 "pseudo_labels.parquet, label_model.json).")
    dev: str | None = Field(None, description="Labelled dataset (`label` = class name) for empirical LF "
                                              "accuracy and calibration.")
    none_label: str = Field("none", description="Dev-set label of samples that belong to no class (left out of "
                                                "the dev accuracy; `webcurate selftrain` learns to reject them).")
    # `str` in the union makes the CLI take one comma-separated value; the validator makes it a list.
    classes: list[str] | str | None = Field(None, description="Class names A,B,C in class-index order (else "
                                                              "`classes:` of --config, else CLASSES in the LF file).")
    config: str | None = Field(None, description="Config file whose `classes:` list names the classes.")
    max_lf_error_rate: float = Field(
        0.5, ge=0, le=1, validation_alias=AliasChoices("max_lf_error_rate", "max_error_rate"),
        description="Stop when an LF raises on more than this fraction of samples (1 = never stop; failed "
                    "samples always count as abstains).")
    sidecars: list[str] | str | None = Field(
        None, description="Sidecar tables STAGE,... merged into each record (default: embeddings,clusters,retrieve "
                          "when present); columns of other stages appear as <stage>_<column>.")
    workers: int | None = Field(None, ge=1, description="Shard tasks in flight (default: Ray's CPUs).")
    model: Literal["labelmodel", "majority", "auto"] = Field(
        "auto", description="labelmodel: learns LF accuracies and LF copies without labels; majority: majority "
                            "vote (ties to the more frequent class); auto: the label model where it is shown "
                            "better than majority vote (on --dev, else by held-out LF agreement), else majority.")
    min_confidence: float = Field(0.0, ge=0, le=1,
                                  description="Export only samples whose label probability is at least this.")
    per_class_cap: int | None = Field(None, ge=0, description="Export at most this many samples per class (the "
                                                               "most confident ones).")
    class_balance: list[float] | str | None = Field(
        None, description="Known class proportions P1,P2,... (in class order); estimated from the votes when omitted.")

    _split = field_validator("classes", "sidecars", mode="before")(split_commas)

    @field_validator("class_balance", mode="before")
    @classmethod
    def _proportions(cls, v: Any) -> Any:
        v = split_commas(v)
        if v is None:
            return None
        try:
            out = [float(x) for x in v]
        except (TypeError, ValueError):
            raise ValueError("expected comma-separated numbers") from None
        if any(x <= 0 for x in out):
            raise ValueError("class proportions must be positive")
        return out


# Options of `webcurate label` that `lf-analysis` (which exports nothing) does not take.
EXPORT_ONLY = ("output", "model", "min_confidence", "per_class_cap", "class_balance")


def _number_or_auto(v: Any, lo: float, hi: float, what: str) -> Any:
    """``"auto"`` as it is, else ``v`` as a float in [lo, hi]; the error says which form was expected."""
    if isinstance(v, str) and v != "auto":
        try:
            v = float(v)
        except ValueError:
            raise ValueError(f"expected {what} or auto") from None
    if not isinstance(v, str) and not lo <= float(v) <= hi:
        raise ValueError(f"expected {what} or auto, got {v}")
    return v


class SelfTrainParams(Params):
    """``webcurate selftrain`` and the ``selftrain:`` step of ``webcurate run``."""

    input: str = Field(description="Dataset to pseudo-label (with an `embeddings` sidecar: `webcurate embed`).")
    seed: str = Field(description="Labelled seed dataset (`label` = class name) embedded by the same model.")
    output: str | None = Field(None, description="Where to write the pseudo-labelled dataset (+ "
                                                 "pseudo_labels.parquet, selftrain.json, _selftrain/ round state).")
    dev: str | None = Field(None, description="Labelled dev dataset embedded by the same model: temperature, dev "
                                              "accuracy and novelty calibration. Samples labelled --none-label are "
                                              "'none of these' examples for open-set rejection.")
    labels: str | None = Field(None, description="Output of `webcurate label` on the same input: its posteriors "
                                                 "are a prior (--prior-weight) and the agreement is reported.")
    classes: list[str] | str | None = Field(None, description="Class names A,B,C in index order (default: the "
                                                              "--labels run's classes, else the seed set's, sorted).")
    none_label: str = Field("none", description="Dev-set label of samples that belong to no class.")
    embeddings: str = Field("embeddings", description="Sidecar holding the vectors (column `embedding`), the same "
                                                      "on input, seed and dev sets.")
    classifier: Literal["logreg", "mlp"] = Field("logreg", description="Classifier on the frozen embeddings: "
                                                                       "softmax regression or a one-hidden-layer MLP.")
    hidden: int = Field(128, ge=1, description="Hidden units of the MLP.")
    l2: float | Literal["auto"] = Field(
        "auto", description="L2 penalty on the classifier's weights (features have unit variance); auto: the "
                            "value of 0.001, 0.01, 0.1, 1 most accurate on the dev set (0.1 without one).")
    max_iter: int = Field(300, ge=1, description="L-BFGS iterations per fit.")
    max_rounds: int = Field(5, ge=0, description="Self-training rounds (0: fit on the seeds only).")
    keep_best_round: bool = Field(True, description="With a dev set: stop when a round's pseudo-labels lower dev "
                                                    "accuracy and label with the best round's classifier.")
    threshold_mode: Literal["fixed", "top_percent"] = Field(
        "fixed", description="fixed: add pseudo-labels with calibrated probability >= --threshold; top_percent: "
                             "per class, the most confident --top-percent % of the samples predicted as it.")
    threshold: float = Field(0.9, gt=0, le=1, description="Confidence a pseudo-label needs (threshold-mode fixed).")
    top_percent: float = Field(20.0, gt=0, le=100, description="Share per class and round (threshold-mode "
                                                               "top_percent).")
    pseudo_weight: float = Field(1.0, gt=0, le=1, description="Training weight of a pseudo-label (seeds weigh 1).")
    prior_weight: float = Field(1.0, ge=0, description="Weight of the --labels posteriors in the product with the "
                                                       "classifier's (0: use them only to report agreement).")
    novelty: Literal["knn", "energy", "maxprob"] = Field(
        "knn", description="Novelty score: distance to the nearest labelled/pseudo-labelled samples, the "
                           "classifier's energy, or 1 - max probability.")
    novelty_k: int = Field(2, ge=1, description="Neighbours of the knn novelty score (mean distance to the k nearest).")
    none_reference: bool = Field(True, description="With 'none' examples in the dev set, the knn score is the "
                                                   "distance to the seeds minus the distance to those examples.")
    novelty_neighbours: Literal["seeds", "seeds_and_pseudo"] = Field(
        "seeds", description="Neighbours of the knn score: the labelled seeds, or also the pseudo-labels (then a "
                             "few off-class samples that slip in make their whole cluster look known).")
    novelty_reference: int = Field(20_000, ge=1, description="At most this many reference samples for the knn "
                                                             "score (seeds always; a seeded sample of the rest).")
    abstain_below: float | Literal["auto"] = Field(
        "auto", description="Leave samples unlabelled whose in-set score (share of in-class dev samples at least "
                            "as novel) is below this; auto: fitted on the dev set's --none-label examples, 0 "
                            "without them.")
    keep_known: float = Field(0.95, gt=0, le=1, description="--abstain-below auto keeps at least this share of "
                                                            "the dev set's in-class samples.")
    min_confidence: float = Field(0.0, ge=0, le=1, description="Export only samples whose final label "
                                                               "probability is at least this.")
    per_class_cap: int | None = Field(None, ge=0, description="Export at most this many samples per class.")
    random_seed: int = Field(0, description="Random seed (MLP initialisation, novelty reference sample).")
    workers: int | None = Field(None, ge=1, description="Shard tasks in flight when writing the output.")

    _split = field_validator("classes", mode="before")(split_commas)

    @field_validator("l2", mode="before")
    @classmethod
    def _l2(cls, v: Any) -> Any:
        return _number_or_auto(v, 0.0, float("inf"), "a number >= 0")

    @field_validator("abstain_below", mode="before")
    @classmethod
    def _abstain(cls, v: Any) -> Any:
        return _number_or_auto(v, 0.0, 1.0, "a number in [0, 1]")

    def record(self) -> dict[str, Any]:
        """What fixes the result: every parameter but where the output goes and how many workers write it."""
        return {k: v for k, v in self.as_record().items() if k not in ("output", "workers")}
