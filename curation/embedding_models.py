"""Embedding models for inference: a timm architecture by name plus weights from a local file.

(The training backbone lives in ``webcurate.train``; curation never imports it.)

Three weight sources, exactly one per run:

- ``weights``: a safetensors file or a torch state dict (``torch.load`` with
  ``weights_only=True``, so no pickled code runs), local or ``s3://``;
- ``checkpoint``: a backbone exported by our own ``webcurate train``
  (``backbone.safetensors`` or the folder holding it), read through the
  exported-backbone contract ``webcurate.shards.backbone_format``;
- ``random_init``: seeded random weights, for tests and smoke runs only.

Never downloads from a model hub (``pretrained=False`` always). The same
``BackboneSpec`` is built once in the driver (to fail early with a clear
message and to hash the weights) and again in every inference actor.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

from webcurate.shards.errors import ConfigError

# Prefixes that training frameworks put in front of backbone parameter names.
_STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.", "encoder.", "teacher.", "student.")
# Containers inside a checkpoint dict that may hold the state dict.
_NESTED_KEYS = ("state_dict", "model", "teacher", "model_ema", "backbone", "student", "module")
# Classifier / projection heads are dropped: we embed with ``num_classes=0``.
_HEAD_RE = re.compile(r"^(head|fc|classifier|head_dist|last_linear)(\.|$)|^head\.fc\.")
RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class BackboneSpec:
    """What to build: picklable, sent to every inference actor."""

    model: str
    weights: str | None = None
    checkpoint: str | None = None
    random_init: bool = False
    image_size: int = 224
    seed: int = RANDOM_INIT_SEED


@dataclass
class BackboneInfo:
    """What was built: recorded in the manifest next to the embeddings."""

    model: str
    dim: int
    weights_sha256: str
    source: str  # "weights" | "checkpoint" | "random-init"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    notes: list[str] = field(default_factory=list)
    image_size: int = 224  # the input size the model expects (images are resized to it)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "dim": self.dim, "weights_sha256": self.weights_sha256,
                "weights_source": self.source, "mean": list(self.mean), "std": list(self.std),
                "image_size": self.image_size}


def validate_spec(spec: BackboneSpec) -> None:
    """Exactly one weight source and a sane image size (the rule of ``EmbedParams``); raises ConfigError."""
    from webcurate.shards.params import parse

    from .stage_params import EmbedParams

    parse(EmbedParams, {"model": spec.model, "weights": spec.weights, "checkpoint": spec.checkpoint,
                        "random_init": spec.random_init, "image_size": spec.image_size}, "embed")


def file_sha256(path: str) -> str:
    """Hex sha256 of a local file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(state: dict[str, Any]) -> str:
    """sha256 over parameter names, shapes and bytes (identifies random-init weights)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _local_copy(uri: str, what: str) -> tuple[str, bool]:
    """A local path for ``uri`` (downloaded when s3://); the bool says it is a temp copy."""
    from webcurate.shards import storage

    if storage.is_s3(uri):
        if not storage.exists(uri):
            raise FileNotFoundError(f"{what} {uri} does not exist")
        fd, tmp = tempfile.mkstemp(prefix="webcurate-weights-", suffix=os.path.splitext(uri)[1])
        os.close(fd)
        storage.copy_to_local(uri, tmp)
        return tmp, True
    if not os.path.isfile(uri):
        raise FileNotFoundError(f"{what} {uri} does not exist or is not a file")
    return uri, False


def load_state_dict_file(path: str) -> dict[str, Any]:
    """Tensors from a safetensors file or a torch state dict, unwrapped and de-prefixed.

    Torch files are loaded with ``weights_only=True``: a file that needs
    arbitrary pickled objects is refused rather than executed.
    """
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            state: Any = load_file(path, device="cpu")
        except Exception as e:
            raise ConfigError(f"cannot read safetensors file {path}: {e}") from e
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConfigError(
                f"cannot load {path} as a torch state dict with weights_only=True "
                f"(only tensors and plain containers are accepted): {type(e).__name__}: {str(e)[:300]}"
            ) from e
    # Unwrap {"state_dict": {...}} / {"model": {...}} / {"teacher": {...}} containers.
    for _ in range(3):
        if not isinstance(state, dict):
            break
        if any(isinstance(v, torch.Tensor) for v in state.values()):
            break
        inner = next((state[k] for k in _NESTED_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} holds no tensors (expected a state dict or a safetensors file)")
    return {_strip(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _STRIP_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def create_timm_model(name: str, image_size: int):
    """``timm.create_model(name, pretrained=False, num_classes=0)`` at ``image_size``.

    ViT-style models take ``img_size`` (their position embedding depends on
    it); ConvNets do not accept it and need no change.
    """
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:6]
        hint = f"; similar names: {', '.join(close)}" if close else "; `timm.list_models()` lists them"
        raise ConfigError(f"unknown timm architecture {name!r}{hint}")
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        return timm.create_model(name, pretrained=False, num_classes=0)


def _fit_state_dict(model, state: dict[str, Any], source: str) -> list[str]:
    """Load ``state`` into ``model`` (heads ignored), resizing ViT position embeddings.

    Raises ConfigError naming the missing or mis-shaped tensors when the file
    does not belong to this architecture. Returns notes for the log.
    """
    import torch

    notes: list[str] = []
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not _HEAD_RE.search(k)}
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid), num_prefix_tokens=prefix)
        notes.append(f"position embedding resampled to grid {tuple(grid)}")
    missing = [k for k in own if k not in state and not _HEAD_RE.search(k)]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
             for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong or len(missing) > 0.5 * max(len(own), 1) or (missing and not any(k in own for k in state)):
        raise ConfigError(
            f"{source} does not fit timm architecture {type(model).__name__}: "
            f"{len(missing)} of {len(own)} tensors missing (e.g. {', '.join(missing[:3]) or '-'}), "
            f"{len(wrong)} with the wrong shape (e.g. {', '.join(wrong[:2]) or '-'})"
        )
    if missing:
        # A few buffers (e.g. relative position indices) may be absent from exports.
        notes.append(f"{len(missing)} tensors kept at their initial values: {', '.join(missing[:5])}")
    if unexpected:
        notes.append(f"{len(unexpected)} tensors in the file ignored: {', '.join(unexpected[:5])}")
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return notes


def build_backbone(spec: BackboneSpec):
    """Build the model for ``spec`` in eval mode on CPU.

    Returns ``(model, info)``: ``model`` maps images (B, 3, S, S) float,
    normalised with ``info.mean``/``info.std``, to features (B, D) (see
    ``pool_features`` for models that return token or map outputs);
    ``info.dim`` is D.
    """
    import torch

    validate_spec(spec)
    notes: list[str] = []
    if spec.checkpoint:
        return _load_own_checkpoint(spec)
    if spec.random_init:
        # Seeded so every actor (and every run) builds the very same weights.
        torch.manual_seed(spec.seed)
        model = create_timm_model(spec.model, spec.image_size)
        sha = "random-init:" + state_dict_sha256(model.state_dict())
        source = "random-init"
    else:
        assert spec.weights is not None
        path, is_tmp = _local_copy(spec.weights, "weights file")
        try:
            sha = file_sha256(path)
            state = load_state_dict_file(path)
        finally:
            if is_tmp:
                os.unlink(path)
        model = create_timm_model(spec.model, spec.image_size)
        notes = _fit_state_dict(model, state, f"weights file {spec.weights}")
        source = "weights"
    model.eval()
    mean, std = _norm_stats(model)
    dim = int(getattr(model, "num_features", 0)) or _probe_dim(model, spec.image_size)
    return model, BackboneInfo(spec.model, dim, sha, source, mean, std, notes, image_size=spec.image_size)


def _norm_stats(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    try:
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(model)
        return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    except Exception:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _probe_dim(model, image_size: int) -> int:
    import torch

    with torch.inference_mode():
        out = pool_features(model(torch.zeros(1, 3, image_size, image_size)))
    return int(out.shape[1])


def pool_features(out: Any):
    """Model output -> (B, D) features.

    (B, D) passes through; (B, C, H, W) maps are averaged over space;
    (B, T, D) token sequences give their first (CLS) token; dict outputs
    (DINOv2 style) give ``x_norm_clstoken`` or their first tensor.
    """
    import torch

    if isinstance(out, dict):
        out = out.get("x_norm_clstoken", next(v for v in out.values() if isinstance(v, torch.Tensor)))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.ndim == 4:
        return out.mean(dim=(2, 3))
    if out.ndim == 3:
        return out[:, 0]
    return out


def resolve_checkpoint(path: str) -> str:
    """The exported ``backbone.safetensors`` of ``path``: the file itself, or the one inside a
    ``webcurate train`` output or checkpoint folder (local or ``s3://``)."""
    from webcurate.shards import storage
    from webcurate.shards.backbone_format import BACKBONE_FILE

    if path.endswith(".safetensors"):
        if not storage.exists(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return path
    inner = storage.join(path, BACKBONE_FILE)
    if storage.exists(inner):
        return inner
    if not storage.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    raise ConfigError(f"{path} holds no {BACKBONE_FILE}; `webcurate train` writes it into its --output folder "
                      "when it finishes (pass that folder or the file). Curation reads only exported backbones.")


def _load_own_checkpoint(spec: BackboneSpec):
    """Backbone exported by ``webcurate train`` (``shards.backbone_format``; the file hash is recorded).

    The architecture recorded in the file wins over ``spec.model`` (which only
    names plain state dicts), and so does its image size: a ViT trained at
    32 px has a 32 px position grid.
    """
    from webcurate.shards.backbone_format import load_backbone_file

    assert spec.checkpoint is not None
    uri = resolve_checkpoint(spec.checkpoint)
    path, is_tmp = _local_copy(uri, "checkpoint")
    try:
        sha = file_sha256(path)
        model, meta = load_backbone_file(path)
    finally:
        if is_tmp:
            os.unlink(path)
    notes: list[str] = []
    image_size = int(meta.image_size or spec.image_size)
    if image_size != spec.image_size:
        notes.append(f"checkpoint was trained at {image_size}px; embedding at {image_size}px, not {spec.image_size}px")
    dim = int(getattr(model, "num_features", 0) or _probe_dim(model, image_size))
    mean, std = _norm_stats(model)
    return model, BackboneInfo(meta.model_name, dim, sha, "checkpoint", mean, std, notes, image_size=image_size)
