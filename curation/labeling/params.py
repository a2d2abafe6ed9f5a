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
        "labelmodel", description="labelmodel: learns LF accuracies and LF copies without labels; majority: "
                                  "majority vote (ties to the more frequent class); auto: whichever is more "
                                  "accurate on --dev.")
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
