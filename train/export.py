"""Export the trained backbone as safetensors, and load backbones back as plain timm models.

``export_backbone`` writes the timm ViT's own state dict (no mask token, no
heads) with metadata naming the timm architecture and its keyword arguments,
so the file loads in stock timm from the local file alone::

    meta = safetensors.safe_open(path, "pt").metadata()
    model = timm.create_model(meta["model_name"], **json.loads(meta["model_kwargs"]))
    model.load_state_dict(safetensors.torch.load_file(path))

(``num_classes=0`` is part of those kwargs: the file holds no classifier.)

``load_backbone`` accepts any of: such a safetensors file, a checkpoint of
``webcurate train`` (``state.pt`` file or its ``checkpoint_*`` folder, or the
run's ``--output`` folder: its ``backbone.safetensors``, else the newest
checkpoint), or a plain torch state dict (then ``model_name`` is needed). It
returns the timm model in eval mode; ``model(x)`` maps (B, 3, H, W) images to
(B, D) normalised CLS embeddings.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

FORMAT = "webcurate-backbone/1"
CHECKPOINT_FORMAT = "webcurate-train-checkpoint/1"
BACKBONE_FILE = "backbone.safetensors"
STATE_FILE = "state.pt"
# Prefixes under which a backbone's timm weights may sit in state dicts we accept.
_PREFIXES = ("module.", "teacher.", "student.", "backbone.vit.", "backbone.", "vit.", "model.", "encoder.")
_CONTAINERS = ("teacher", "model", "state_dict", "student", "backbone")


def export_backbone(backbone: nn.Module, path: str, *, extra: dict[str, Any] | None = None) -> str:
    """Write ``backbone.vit``'s weights (a ``webcurate.train.backbone.Backbone``) to ``path``.

    ``path`` may be local or ``s3://``; metadata records ``model_name``,
    ``model_kwargs`` (JSON), ``image_size`` and anything in ``extra``.
    Returns ``path``.
    """
    state = {k: v.detach().to("cpu").contiguous() for k, v in backbone.vit.state_dict().items()}
    meta = backbone_metadata(backbone.model_name, backbone.model_kwargs, extra)
    return save_safetensors(state, path, meta)


def backbone_metadata(model_name: str, model_kwargs: dict[str, Any],
                      extra: dict[str, Any] | None = None) -> dict[str, str]:
    """safetensors metadata (str -> str) describing a timm backbone."""
    meta = {"format": FORMAT, "model_name": model_name, "model_kwargs": json.dumps(model_kwargs, sort_keys=True),
            "image_size": str(model_kwargs.get("img_size", ""))}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def save_safetensors(state: dict[str, torch.Tensor], path: str, meta: dict[str, str]) -> str:
    """Save tensors + metadata to a local path or ``s3://`` URI (atomically)."""
    from safetensors.torch import save_file

    from webcurate.shards import storage

    tmp_dir = storage.local_tempdir("webcurate-export-")
    tmp = os.path.join(tmp_dir, BACKBONE_FILE)
    try:
        save_file(state, tmp, metadata=meta)
        storage.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.rmdir(tmp_dir)
    return path


def read_metadata(path: str) -> dict[str, str]:
    """The metadata of a local safetensors file (empty when it has none)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def _create_from_safetensors(path: str, model_name: str | None) -> nn.Module:
    from safetensors.torch import load_file

    meta = read_metadata(path)
    name = model_name or meta.get("model_name")
    if not name:
        raise ValueError(f"{path} does not name its timm architecture; pass model_name")
    kwargs = json.loads(meta["model_kwargs"]) if "model_kwargs" in meta else {"num_classes": 0}
    # The local tensors into the named architecture: timm's pretrained machinery (and its hub) is never asked.
    return _from_state(load_file(path), name, kwargs, path)


def _strip_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reduce a state dict to the timm ViT's keys (drop heads, mask token, prefixes)."""
    out = dict(state)
    changed = True
    while changed:  # prefixes may nest (module.backbone.vit.)
        changed = False
        for p in _PREFIXES:
            if out and all(k.startswith(p) for k in out):
                out = {k[len(p):]: v for k, v in out.items()}
                changed = True
        if any(k.startswith("backbone.vit.") for k in out):  # a whole SSLModel: keep the backbone
            out = {k[len("backbone.vit."):]: v for k, v in out.items() if k.startswith("backbone.vit.")}
            changed = True
    drop = ("mask_token", "dino_head.", "ibot_head.", "head.")
    return {k: v for k, v in out.items() if not k.startswith(drop) and k != "mask_token"}


def _from_state(state: dict[str, Any], model_name: str | None, model_kwargs: dict[str, Any] | None,
                source: str) -> nn.Module:
    from .backbone import create_vit

    if model_name is None:
        raise ValueError(f"{source} is a plain state dict: pass model_name (a timm ViT name) to load it")
    kwargs = dict(model_kwargs or {"num_classes": 0})
    model = create_vit(model_name, kwargs)
    sd = _strip_to_timm({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        sd = checkpoint_filter_fn(sd, model)  # resamples position embeddings to this model's grid
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches: another architecture's weights
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e)[:300])
        raise ValueError(f"{source} does not fit {model_name} {kwargs}: {first}") from e
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise ValueError(f"{source} does not fit {model_name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.webcurate_info = {"model": model_name, "model_kwargs": kwargs,  # type: ignore[attr-defined]
                            "image_size": kwargs.get("img_size"), "dim": int(model.num_features)}
    return model


def _newest_checkpoint_dir(root: str) -> str | None:
    from .checkpoint import list_checkpoints

    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_backbone_path(path: str) -> str:
    """A file to load for ``path``: the file itself, or inside a folder its state/export file."""
    if not os.path.isdir(path):
        return path
    for name in (STATE_FILE, BACKBONE_FILE):
        if os.path.exists(os.path.join(path, name)):
            return os.path.join(path, name)
    ckpt = _newest_checkpoint_dir(path)
    if ckpt and os.path.exists(os.path.join(ckpt, STATE_FILE)):
        return os.path.join(ckpt, STATE_FILE)
    raise FileNotFoundError(f"{path} holds neither {BACKBONE_FILE}, {STATE_FILE} nor checkpoints of `webcurate train`")


def load_backbone(path: str, model_name: str | None = None) -> nn.Module:
    """Load a backbone as a plain timm ViT (eval mode) from a local file or folder.

    Args:
        path: a safetensors export, a ``webcurate train`` checkpoint (file or
            folder), a run output folder, or a torch state dict file.
        model_name: timm architecture; needed only for plain state dicts
            (overrides the name recorded in our files otherwise).

    Returns:
        the timm model; ``model(x)``: (B, 3, H, W) -> (B, D) CLS embeddings.
        ``model.webcurate_info`` holds ``model``, ``model_kwargs``, ``image_size``, ``dim``.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"backbone {path} does not exist")
    path = resolve_backbone_path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if path.endswith(".safetensors") or (len(head) >= 9 and head[8:9] == b"{"):
        model = _create_from_safetensors(path, model_name)
        return model.eval()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with arbitrary objects, or not a torch file at all
        raise ValueError(f"{path} is neither safetensors nor a torch state dict/checkpoint: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    name, kwargs = model_name, None
    if obj.get("format") == CHECKPOINT_FORMAT:
        name = model_name or obj["model_name"]
        kwargs = obj["model_kwargs"]
        state = obj["teacher"]  # DINOv2 evaluates the EMA teacher
    else:
        state = obj
        for c in _CONTAINERS:
            if isinstance(obj.get(c), dict):
                state = obj[c]
                break
    return _from_state(state, name, kwargs, path).eval()


__all__ = ["export_backbone", "load_backbone", "read_metadata", "backbone_metadata", "save_safetensors",
           "resolve_backbone_path", "BACKBONE_FILE", "STATE_FILE", "CHECKPOINT_FORMAT"]
