"""Export trained backbones through the contract (``shards/backbone_format.py``), and load them back.

Writing: ``export_backbone(model, uri)`` writes the timm model inside a
training wrapper (no heads, no mask token, no classifier) as
``backbone.safetensors`` with its ``BackboneMeta`` (timm name, kwargs with
``num_classes=0``, image size, small-image stem marker). Stock timm loads it
(see the contract's docstring); so do ``webcurate embed --checkpoint`` and
``webcurate eval``.

Reading: ``load_backbone`` accepts such a file, a run's ``--output`` folder
(its ``backbone.safetensors``, else the newest checkpoint's), a checkpoint
folder or its ``state.pt``, or a plain torch state dict of a timm model (then
``model_name`` is needed). It returns the timm model in eval mode;
``model(x)`` maps (B, 3, H, W) images to (B, D) features, and
``model.webcurate_info`` holds ``model``, ``model_kwargs``, ``image_size``, ``dim``.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from webcurate.shards.backbone_format import (BACKBONE_FILE, BackboneFormatError, BackboneMeta, build_timm_backbone,
                                              create_timm_model, read_backbone, write_backbone)

from .checkpoint import CHECKPOINT_FORMAT, STATE_FILE, list_checkpoints

_BACKBONE_PREFIX = "backbone.model."
# Prefixes under which a timm model's weights sit in state dicts of other trainers.
_PREFIXES = ("module.", "_orig_mod.", "teacher.", "student.", "backbone.model.", "backbone.vit.", "backbone.",
             "vit.", "model.", "encoder.")
_CONTAINERS = ("teacher", "model", "state_dict", "student", "backbone")


def backbone_state(model: nn.Module, full_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The timm state dict of ``model.backbone`` (CPU, contiguous); from ``full_state`` (a gathered
    FSDP state dict of the whole model) when given."""
    if full_state is None:
        state = model.backbone.model.state_dict()
    else:
        state = {k[len(_BACKBONE_PREFIX):]: v for k, v in full_state.items() if k.startswith(_BACKBONE_PREFIX)}
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def export_backbone(model: nn.Module, uri: str, *, extra: dict[str, str] | None = None,
                    full_state: dict[str, torch.Tensor] | None = None) -> str:
    """Write ``model.backbone`` (a training wrapper's) to ``uri`` (local or ``s3://``) in the contract format."""
    meta = model.backbone.meta
    if extra:
        meta = BackboneMeta(meta.model_name, meta.model_kwargs, meta.image_size, meta.stem,
                            {**meta.extra, **{k: str(v) for k, v in extra.items()}})
    return write_backbone(backbone_state(model, full_state), meta, uri)


def _with_info(model: nn.Module, meta: BackboneMeta) -> nn.Module:
    model.webcurate_info = {"model": meta.model_name, "model_kwargs": dict(meta.model_kwargs),  # type: ignore[attr-defined]
                            "image_size": meta.image_size, "dim": int(model.num_features), "stem": meta.stem}
    return model


def resolve_backbone_path(path: str) -> str:
    """A file to load for ``path``: the file itself, or inside a folder its export / state file,
    else the newest checkpoint's."""
    if not os.path.isdir(path):
        return path
    for name in (BACKBONE_FILE, STATE_FILE):
        if os.path.exists(os.path.join(path, name)):
            return os.path.join(path, name)
    found = list_checkpoints(path)
    if found:
        for name in (BACKBONE_FILE, STATE_FILE):
            candidate = os.path.join(found[-1][1], name)
            if os.path.exists(candidate):
                return candidate
    raise FileNotFoundError(f"{path} holds neither {BACKBONE_FILE}, {STATE_FILE} nor checkpoints of `webcurate train`")


def _strip_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reduce a state dict to a timm model's keys (drop heads, mask token, wrapper prefixes)."""
    out = dict(state)
    if any(k.startswith(_BACKBONE_PREFIX) for k in out):  # a whole training wrapper: keep its backbone
        out = {k[len(_BACKBONE_PREFIX):]: v for k, v in out.items() if k.startswith(_BACKBONE_PREFIX)}
    changed = True
    while changed:  # prefixes may nest (module.backbone.vit.)
        changed = False
        for p in _PREFIXES:
            if out and all(k.startswith(p) for k in out):
                out = {k[len(p):]: v for k, v in out.items()}
                changed = True
    drop = ("mask_token", "dino_head.", "ibot_head.", "heads.", "head.", "fc.")
    return {k: v for k, v in out.items() if not k.startswith(drop)}


def _from_plain_state(state: dict[str, Any], model_name: str, source: str) -> nn.Module:
    """A timm model ``model_name`` (default architecture, ``num_classes=0``) from a foreign state dict."""
    sd = _strip_to_timm({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    try:
        model = create_timm_model(BackboneMeta(model_name, {"num_classes": 0}, 224))
    except BackboneFormatError as e:
        raise ValueError(f"{source}: {e}") from None
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    try:
        if isinstance(model, VisionTransformer):
            sd = checkpoint_filter_fn(sd, model)  # resamples position embeddings to this model's grid
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # shape mismatches or missing keys: another architecture's weights
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else str(e))
        raise ValueError(f"{source} does not fit {model_name}: {first[:300]}") from None
    size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1]
    return _with_info(model, BackboneMeta(model_name, {"num_classes": 0}, int(size)))


def _from_checkpoint_state(obj: dict[str, Any], source: str) -> nn.Module:
    meta = BackboneMeta.from_strings(obj["backbone_meta"], source)
    # DINO evaluates the EMA teacher; the other methods their online network.
    from .methods.registry import get_method

    part = "teacher" if obj.get("teacher") and get_method(obj["method"]).family == "dino" else "student"
    state = {k[len(_BACKBONE_PREFIX):]: v for k, v in obj[part].items() if k.startswith(_BACKBONE_PREFIX)}
    try:
        return _with_info(build_timm_backbone(meta, state, source), meta)
    except BackboneFormatError as e:
        raise ValueError(str(e)) from None


def load_backbone(path: str, model_name: str | None = None) -> nn.Module:
    """Load a backbone as a plain timm model (eval mode) from a local file or folder (see the module docstring).

    Args:
        path: an exported ``backbone.safetensors``, a ``webcurate train`` run or checkpoint
            (folder or ``state.pt``), or a torch state dict file.
        model_name: timm architecture; needed only for plain state dicts.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"backbone {path} does not exist")
    path = resolve_backbone_path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if path.endswith(".safetensors") or (len(head) >= 9 and head[8:9] == b"{"):
        try:
            state, meta = read_backbone(path)
            return _with_info(build_timm_backbone(meta, state, path), meta).eval()
        except BackboneFormatError as e:
            raise ValueError(str(e)) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with arbitrary objects, or not a torch file at all
        raise ValueError(f"{path} is neither safetensors nor a torch state dict/checkpoint: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if str(obj.get("format", "")).startswith("webcurate-train-checkpoint/"):
        if obj["format"] != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is a {obj['format']} checkpoint of an older webcurate; "
                             f"load its {BACKBONE_FILE} instead")
        return _from_checkpoint_state(obj, path).eval()
    if model_name is None:
        raise ValueError(f"{path} is a plain state dict: pass model_name (a timm model name) to load it")
    state = obj
    for c in _CONTAINERS:
        if isinstance(obj.get(c), dict):
            state = obj[c]
            break
    return _from_plain_state(state, model_name, path).eval()


__all__ = ["export_backbone", "backbone_state", "load_backbone", "resolve_backbone_path", "BACKBONE_FILE"]
