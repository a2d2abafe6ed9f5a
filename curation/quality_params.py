"""Parameters of `webcurate filter` and `webcurate score`, declared once (shards/params.py).

Kept apart from the stages so the command line can build its options from
them without importing numpy, scipy or torch.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from webcurate.shards.params import Params

from .captions import JUNK_FILENAME, JUNK_NO_LETTERS, JUNK_URL

# Every reason a sample can be filtered for, in the order they are listed in ``reason``.
IMAGE_REASONS = ("undecodable", "dark", "bright", "blank", "low_information", "blurry", "noise", "grayscale",
                 "jpeg_artefacts", "upscaled", "small", "aspect")
CAPTION_REASONS = ("no_caption", "caption_short", "caption_long", f"caption_{JUNK_URL}", f"caption_{JUNK_FILENAME}",
                   f"caption_{JUNK_NO_LETTERS}", "caption_duplicate")
REASONS = IMAGE_REASONS + CAPTION_REASONS
FilterName = Literal["dark", "bright", "blank", "low_information", "blurry", "noise", "grayscale", "jpeg_artefacts",
                     "upscaled", "small", "aspect", "caption_short", "caption_long", "caption_junk",
                     "caption_duplicate"]
# The quality column (or columns) behind each image filter, as the report shows them.
SCORE_OF = {"dark": "brightness", "bright": "brightness", "blank": "contrast", "low_information": "entropy",
            "blurry": "blur", "noise": "noise", "grayscale": "colorfulness", "jpeg_artefacts": "blockiness",
            "upscaled": "upscale"}


class FilterParams(Params):
    """Thresholds of ``webcurate filter``; ``null`` in YAML turns one filter off (so does ``--skip NAME``)."""

    min_brightness: float | None = Field(20.0, ge=0, le=255, description="dark: mean luma below this (0..255).")
    max_brightness: float | None = Field(235.0, ge=0, le=255, description="bright: mean luma above this (0..255).")
    min_contrast: float | None = Field(5.0, ge=0, le=128,
                                       description="blank / near-constant: luma standard deviation below this.")
    min_entropy: float | None = Field(3.0, ge=0, le=8,
                                      description="low_information: luma histogram entropy below this (bits, 0..8).")
    min_blur: float | None = Field(25.0, ge=0,
                                   description="blurry: variance of the Laplacian below this (image fit to 256 px).")
    max_noise: float | None = Field(0.6, ge=0, le=2,
                                    description="noise / text: 1 - neighbour-pixel correlation above this (photos "
                                                "~0.1, 32 px ones up to 0.5; pixel noise and small text higher).")
    min_colorfulness: float | None = Field(None, ge=0, le=255,
                                           description="grayscale: mean max-min channel spread below this "
                                                       "(off by default; 2 drops grayscale images).")
    max_blockiness: float | None = Field(2.5, ge=1,
                                         description="jpeg_artefacts: 8x8 block-edge / in-block gradient above this.")
    max_upscale: float | None = Field(4.0, ge=2, le=8,
                                      description="upscaled: the image holds no more detail than one this many "
                                                  "times smaller (a tiny picture blown up).")
    min_side: int | None = Field(16, ge=1, description="small: shorter side (original size when known) below this.")
    max_aspect: float | None = Field(3.0, ge=1, description="aspect: long / short side above this.")
    min_caption_chars: int | None = Field(3, ge=0, description="caption_short: captions shorter than this.")
    max_caption_chars: int | None = Field(None, ge=1, description="caption_long: captions longer than this.")
    caption_junk: bool = Field(True, description="caption_junk: drop URL-only, file-name-like and letterless "
                                                 "captions.")
    max_caption_repeats: int | None = Field(10, ge=1,
                                            description="caption_duplicate: drop every sample whose caption text "
                                                        "is shared by more samples than this (boilerplate).")
    require_caption: bool = Field(False, description="no_caption: drop samples without a caption.")
    min_score: list[str] = Field(default_factory=list,
                                 description="NAME=VALUE: drop samples whose `webcurate score --name NAME` score "
                                             "is below VALUE (repeatable).")
    skip: list[FilterName] = Field(default_factory=list, description="Filters to turn off (repeatable).")
    max_removed: float = Field(0.5, gt=0, le=1,
                               description="Refuse a filter that removes more than this share of the pool.")
    allow_mass_removal: bool = Field(False, description="Apply the filter even when it removes more than "
                                                        "--max-removed of the pool.")

    @field_validator("min_score", mode="before")
    @classmethod
    def _score_list(cls, v: Any) -> Any:
        if isinstance(v, dict):  # YAML: min_score: {aesthetic: 0.5}
            return [f"{k}={x}" for k, x in v.items()]
        if isinstance(v, str):
            return [v]
        return v

    @field_validator("min_score")
    @classmethod
    def _score_format(cls, v: list[str]) -> list[str]:
        for item in v:
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"expected NAME=VALUE, got {item!r}")
            try:
                if not math.isfinite(float(value)):
                    raise ValueError
            except ValueError:
                raise ValueError(f"{item!r}: VALUE must be a finite number") from None
        return v

    @model_validator(mode="after")
    def _ranges(self) -> "FilterParams":
        if None not in (self.min_brightness, self.max_brightness) and self.min_brightness >= self.max_brightness:
            raise ValueError(f"min_brightness ({self.min_brightness}) must be below max_brightness "
                             f"({self.max_brightness})")
        if None not in (self.min_caption_chars, self.max_caption_chars) and \
                self.min_caption_chars > self.max_caption_chars:
            raise ValueError(f"min_caption_chars ({self.min_caption_chars}) must not exceed max_caption_chars "
                             f"({self.max_caption_chars})")
        return self

    @property
    def score_floors(self) -> dict[str, float]:
        """``{score name: minimum}`` from ``min_score``."""
        return {k.strip(): float(v) for k, _, v in (s.partition("=") for s in self.min_score)}

    def decision_record(self) -> dict[str, Any]:
        """What decides the rows (the mass-removal guard does not: changing it re-decides nothing)."""
        return {k: v for k, v in self.as_record().items() if k not in ("max_removed", "allow_mass_removal")}


def score_stage(name: str) -> str:
    """Sidecar of ``webcurate score --name NAME``."""
    return f"score_{name}"


class ScoreParams(Params):
    """Parameters of ``webcurate score``."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
                             description="Name of the score (sidecar score_NAME); default: the head's or "
                                         "weights' file name without extension.")
    model: str | None = Field(None, description="timm architecture of the classifier or backbone.")
    weights: str | None = Field(None, description="Weights of --model: safetensors or torch state dict.")
    checkpoint: str | None = Field(None, description="A `webcurate train` backbone instead of --weights "
                                                     "(needs --head).")
    head: str | None = Field(None, description="Linear head file (weight (C, D), bias (C,)): on --model's "
                                               "features, or on the dataset's embeddings without --model.")
    activation: Literal["auto", "raw", "sigmoid", "softmax"] = Field(
        "auto", description="How outputs become scores; auto: sigmoid for 1 output, softmax for several.")
    output: int = Field(-1, description="Which output is the score (0-based; -1 = the last).")
    image_size: int = Field(224, ge=16, le=4096, description="Input size for --model (resize + centre crop).")
    batch_size: int = Field(64, ge=1, description="Images per forward pass.")

    @model_validator(mode="after")
    def _sources(self) -> "ScoreParams":
        if not self.model and not self.head:
            raise ValueError("give --model NAME --weights FILE (a timm classifier), and/or --head FILE")
        if self.model and not (self.weights or self.checkpoint):
            raise ValueError(f"--model {self.model} needs --weights FILE (webcurate never downloads weights)")
        if self.weights and self.checkpoint:
            raise ValueError("give either --weights or --checkpoint, not both")
        if (self.weights or self.checkpoint) and not self.model:
            raise ValueError("--weights/--checkpoint need --model NAME (the timm architecture)")
        if self.checkpoint and not self.head:
            raise ValueError("--checkpoint is a backbone without a classifier: add --head FILE")
        return self

    @property
    def score_name(self) -> str:
        if self.name:
            return self.name
        stem = os.path.basename(str(self.head or self.weights)).split(".")[0]
        return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "score"
