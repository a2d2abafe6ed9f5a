"""The exported-backbone contract: one safetensors file that training writes and curation reads.

``train`` (the writer) and ``curation`` (the reader) never import each other;
both use this module. A backbone is one file, ``backbone.safetensors``, holding
the timm model's own state dict (no heads, no mask token, no classifier) and
string metadata:

========================  =========================================================
``format``                ``FORMAT`` (``webcurate-backbone/1``)
``model_name``            the timm architecture (``vit_small_patch16_224``, ``resnet18``)
``model_kwargs``          JSON of the ``timm.create_model`` keyword arguments; always
                          holds ``num_classes: 0`` (the model returns features)
``image_size``            the input side the backbone was trained at, in pixels
``stem``                  optional; ``small_image`` = the ConvNet stem was replaced by a
                          3x3 stride-1 conv and no max-pool (32-64 px inputs)
anything else             free-form strings (method, training step, ...), kept as given
========================  =========================================================

In stock timm, without webcurate::

    from safetensors import safe_open
    from safetensors.torch import load_file
    meta = safe_open(path, "pt").metadata()
    model = timm.create_model(meta["model_name"], pretrained=False, **json.loads(meta["model_kwargs"]))
    if meta.get("stem") == "small_image":          # ConvNets trained on 32-64 px inputs
        model.conv1 = torch.nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    model.load_state_dict(load_file(path))

``build_timm_backbone`` does exactly that (and never asks a model hub).
Torch, timm and safetensors are imported inside the functions so that
importing ``webcurate.shards`` stays light (ingest workers never load torch).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn

FORMAT = "webcurate-backbone/1"
BACKBONE_FILE = "backbone.safetensors"

KEY_FORMAT = "format"
KEY_MODEL_NAME = "model_name"
KEY_MODEL_KWARGS = "model_kwargs"
KEY_IMAGE_SIZE = "image_size"
KEY_STEM = "stem"
RESERVED_KEYS = (KEY_FORMAT, KEY_MODEL_NAME, KEY_MODEL_KWARGS, KEY_IMAGE_SIZE, KEY_STEM)

STEM_SMALL_IMAGE = "small_image"  # 3x3 conv, stride 1, padding 1, no max-pool
STEMS = (STEM_SMALL_IMAGE,)


class BackboneFormatError(ConfigError):
    """A file that is not a usable exported backbone (the message names the file and what is wrong)."""


@dataclass(frozen=True)
class BackboneMeta:
    """What a reader needs to rebuild the backbone; ``extra`` holds free-form string metadata."""

    model_name: str
    model_kwargs: dict[str, Any]
    image_size: int
    stem: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.model_name:
            raise BackboneFormatError("backbone metadata needs a model_name")
        if self.model_kwargs.get("num_classes") != 0:
            raise BackboneFormatError(f"model_kwargs must hold num_classes=0 (features, no classifier), "
                                      f"got {self.model_kwargs.get('num_classes')!r}")
        if self.stem is not None and self.stem not in STEMS:
            raise BackboneFormatError(f"unknown stem {self.stem!r}; known: {', '.join(STEMS)}")
        if int(self.image_size) <= 0:
            raise BackboneFormatError(f"image_size must be > 0, got {self.image_size!r}")
        clash = sorted(set(self.extra) & set(RESERVED_KEYS))
        if clash:
            raise BackboneFormatError(f"extra metadata may not use the reserved key(s) {', '.join(clash)}")

    def to_strings(self) -> dict[str, str]:
        """The safetensors metadata (str -> str)."""
        out = {KEY_FORMAT: FORMAT, KEY_MODEL_NAME: self.model_name,
               KEY_MODEL_KWARGS: json.dumps(self.model_kwargs, sort_keys=True),
               KEY_IMAGE_SIZE: str(int(self.image_size))}
        if self.stem:
            out[KEY_STEM] = self.stem
        out.update({k: str(v) for k, v in self.extra.items()})
        return out

    @classmethod
    def from_strings(cls, meta: dict[str, str], source: str = "backbone") -> "BackboneMeta":
        """Parse safetensors metadata; ``BackboneFormatError`` names ``source`` and the missing key."""
        if meta.get(KEY_FORMAT) != FORMAT:
            raise BackboneFormatError(f"{source} is not a webcurate backbone export "
                                      f"(format {meta.get(KEY_FORMAT)!r}, expected {FORMAT!r})")
        for key in (KEY_MODEL_NAME, KEY_MODEL_KWARGS):
            if not meta.get(key):
                raise BackboneFormatError(f"{source} lacks the metadata key {key!r}")
        try:
            kwargs = json.loads(meta[KEY_MODEL_KWARGS])
        except json.JSONDecodeError as e:
            raise BackboneFormatError(f"{source}: model_kwargs is not JSON: {e}") from None
        if not isinstance(kwargs, dict):
            raise BackboneFormatError(f"{source}: model_kwargs must be a JSON object")
        size = meta.get(KEY_IMAGE_SIZE) or kwargs.get("img_size")
        try:
            image_size = int(size)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise BackboneFormatError(f"{source}: image_size {size!r} is not an integer") from None
        extra = {k: v for k, v in meta.items() if k not in RESERVED_KEYS}
        return cls(meta[KEY_MODEL_NAME], kwargs, image_size, meta.get(KEY_STEM) or None, extra)


def write_backbone(state: dict[str, "torch.Tensor"], meta: BackboneMeta, path: str) -> str:
    """Write ``state`` (a timm model's state dict) and ``meta`` to ``path`` (local or ``s3://``), atomically.

    Readers never see a partial file: the file is written to a local temp folder,
    then moved (local) or uploaded (S3 multipart, completed last) by
    ``shards.storage.put_file``. Returns ``path``.
    """
    from safetensors.torch import save_file

    from . import storage

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    tmp_dir = storage.local_tempdir("webcurate-backbone-")
    tmp = os.path.join(tmp_dir, BACKBONE_FILE)
    try:
        save_file(tensors, tmp, metadata=meta.to_strings())
        storage.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.rmdir(tmp_dir)
    return path


def read_metadata(path: str) -> dict[str, str]:
    """The raw string metadata of a safetensors file (local or ``s3://``); empty when it has none."""
    header = _header(path)
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def _header(path: str) -> dict[str, Any]:
    """The JSON header of a safetensors file: 8-byte little-endian length, then that much JSON."""
    from . import storage

    if storage.is_s3(path):
        data = storage.read_bytes(path)
        n, body = int.from_bytes(data[:8], "little"), data[8:]
    else:
        if not os.path.exists(path):
            raise FileNotFoundError(f"backbone {path} does not exist")
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            body = f.read(min(n, 100 << 20))
    try:
        return json.loads(body[:n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BackboneFormatError(f"{path} is not a safetensors file") from None


def read_backbone(path: str) -> tuple[dict[str, "torch.Tensor"], BackboneMeta]:
    """``(state, meta)`` of an exported backbone at ``path`` (local or ``s3://``).

    Raises ``FileNotFoundError`` when it does not exist and ``BackboneFormatError``
    when it is not a webcurate backbone export.
    """
    from safetensors.torch import load, load_file

    from . import storage

    meta = BackboneMeta.from_strings(read_metadata(path), path)
    try:
        state = load(storage.read_bytes(path)) if storage.is_s3(path) else load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise BackboneFormatError(f"{path}: cannot read its tensors: {e}") from None
    return state, meta


def apply_small_image_stem(model: "nn.Module") -> "nn.Module":
    """Replace a timm ResNet-style stem by a 3x3 stride-1 conv without max-pool (in place).

    The new ``conv1`` keeps the old one's output width; the model must have a plain
    ``conv1`` Conv2d and a ``maxpool`` (timm ``ResNet``), else ``BackboneFormatError``.
    """
    from torch import nn

    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise BackboneFormatError(f"the small-image stem needs a ResNet-style model with a plain conv1 "
                                  f"and a maxpool; {type(model).__name__} has none")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def create_timm_model(meta: BackboneMeta, **overrides: Any) -> "nn.Module":
    """``timm.create_model`` of ``meta`` with random weights (``pretrained=False``: no hub), stem applied.

    ``overrides`` add training-only keyword arguments (e.g. ``drop_path_rate``).
    """
    import timm

    try:
        model = timm.create_model(meta.model_name, pretrained=False, **{**meta.model_kwargs, **overrides})
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise BackboneFormatError(f"{meta.model_name!r} is not a timm model") from None
        raise
    if meta.stem == STEM_SMALL_IMAGE:
        apply_small_image_stem(model)
    return model


def build_timm_backbone(meta: BackboneMeta, state: dict[str, "torch.Tensor"], source: str = "backbone") -> "nn.Module":
    """The timm model of ``meta`` with ``state`` loaded strictly, in eval mode.

    ``model(x)``: (B, 3, H, W) -> (B, D) features (the CLS token for ViTs, pooled
    features for ConvNets). ``BackboneFormatError`` names ``source`` when the
    tensors do not fit the architecture.
    """
    model = create_timm_model(meta)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "size mismatch" in ln or "Missing" in ln or "Unexpected" in ln),
                     lines[0] if lines else str(e))
        raise BackboneFormatError(f"{source} does not fit {meta.model_name} {meta.model_kwargs}: {first[:300]}") from None
    return model.eval()


def load_backbone_file(path: str) -> tuple["nn.Module", BackboneMeta]:
    """``read_backbone`` then ``build_timm_backbone``: the eval-mode timm model and its metadata."""
    state, meta = read_backbone(path)
    return build_timm_backbone(meta, state, path), meta


__all__ = ["FORMAT", "BACKBONE_FILE", "KEY_FORMAT", "KEY_MODEL_NAME", "KEY_MODEL_KWARGS", "KEY_IMAGE_SIZE",
           "KEY_STEM", "STEM_SMALL_IMAGE", "BackboneMeta", "BackboneFormatError", "write_backbone",
           "read_backbone", "read_metadata", "build_timm_backbone", "create_timm_model",
           "apply_small_image_stem", "load_backbone_file"]
