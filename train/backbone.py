"""Backbones: a timm ViT or ConvNet by name, wrapped for self-supervised training.

``build_backbone`` creates the timm model through the exported-backbone
contract (``shards.backbone_format.create_timm_model``: ``pretrained=False``,
the small-image stem patch), so what trains is exactly what a reader rebuilds.
The timm model sits in ``Backbone.model`` with timm's own parameter names.

- ``ViTBackbone`` adds what DINOv2/iBOT need and timm lacks: a learned
  ``mask_token`` replacing the embeddings of masked patches (before position
  embeddings, as in DINOv2) and outputs split into CLS, register and patch
  tokens. Crops of any multiple of the patch size are accepted
  (``dynamic_img_size``: position embeddings are resampled for local crops).
- ``ConvBackbone`` (ResNets and other timm ConvNets) returns timm's pooled
  features; ``model.stem=small_image`` swaps the ResNet stem for a 3x3
  stride-1 conv without max-pool, as CIFAR codebases do on 32 px inputs.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from webcurate.shards.backbone_format import BackboneFormatError, BackboneMeta, create_timm_model
from webcurate.shards.errors import ConfigError

from .config import ModelConfig

_VIT_ONLY = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "reg_tokens", "img_size")


@functools.lru_cache(maxsize=64)
def is_vit_name(name: str) -> bool:
    """Whether the timm architecture ``name`` is a VisionTransformer (no weights are allocated)."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(_meta_model(name, {"num_classes": 0}), VisionTransformer)


def _meta_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"model.name={name!r} is not a timm model; see timm.list_models()") from None
        raise
    except TypeError as e:
        raise ConfigError(f"model: {name} does not take these options: {e}") from None


def timm_model_kwargs(cfg: ModelConfig, img_size: int) -> dict[str, Any]:
    """The ``timm.create_model`` keyword arguments for ``cfg`` at ``img_size`` (training-only ones left out).

    ``num_classes=0`` makes the model return features: the CLS token for ViTs
    (``global_pool="token"``), pooled features for ConvNets.
    """
    if not is_vit_name(cfg.name):
        set_vit = [n for n in _VIT_ONLY if getattr(cfg, n) is not None]
        if set_vit:
            raise ConfigError(f"model.{set_vit[0]} is a ViT option; model.name={cfg.name} is a ConvNet "
                              "(set its width with model.timm_kwargs, e.g. channels and stem_width)")
        return {"num_classes": 0, **(cfg.timm_kwargs or {})}
    if cfg.stem != "standard":
        raise ConfigError(f"model.stem={cfg.stem} is a ConvNet option; {cfg.name} is a ViT")
    kw: dict[str, Any] = {"num_classes": 0, "global_pool": "token", "class_token": True, "dynamic_img_size": True,
                          "img_size": int(cfg.img_size or img_size)}
    for name in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "reg_tokens"):
        v = getattr(cfg, name)
        if v is not None:
            kw[name] = v
    # None must reach timm too: it is how LayerScale is switched off for archs that enable it.
    kw["init_values"] = cfg.layerscale
    kw.update(cfg.timm_kwargs or {})
    return kw


def backbone_meta(cfg: ModelConfig, img_size: int) -> BackboneMeta:
    """The contract metadata of the backbone ``cfg`` describes."""
    stem = "small_image" if cfg.stem == "small_image" else None
    return BackboneMeta(cfg.name, timm_model_kwargs(cfg, img_size), int(cfg.img_size or img_size), stem)


class Backbone(nn.Module):
    """Base of the wrappers: ``model`` (timm), ``meta`` (contract metadata), ``embed_dim`` D, ``kind``."""

    kind = "base"

    def __init__(self, model: nn.Module, meta: BackboneMeta):
        super().__init__()
        self.model = model
        self.meta = meta
        self.embed_dim = int(model.num_features)

    @property
    def model_name(self) -> str:
        return self.meta.model_name

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return dict(self.meta.model_kwargs)

    def shard_units(self) -> list[nn.Module]:
        """Sub-modules FSDP shards one by one (then the root)."""
        return []


class ViTBackbone(Backbone):
    """A timm ViT that takes an optional patch mask and returns CLS, register and patch tokens.

    Extra attributes: ``mask_token`` (1, D), ``patch_size`` P, ``num_reg_tokens`` R.
    """

    kind = "vit"

    def __init__(self, model: nn.Module, meta: BackboneMeta):
        super().__init__(model, meta)
        ps = model.patch_embed.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.num_reg_tokens = int(getattr(model, "num_reg_tokens", 0))
        if model.cls_token is None:
            raise ConfigError(f"{meta.model_name} has no class token; the training methods need one")
        # Zeros as in DINOv2: a masked patch starts as "no content" and the token learns from there.
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))

    def shard_units(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Encode images, replacing masked patch embeddings by the mask token.

        Args:
            x: (B, 3, H, W) normalised images, H and W multiples of ``patch_size``.
            masks: optional (B, N) bool, N = (H/P)*(W/P); True = masked patch.

        Returns:
            dict with ``cls`` (B, D), ``reg`` (B, R, D) and ``patch`` (B, N, D), all after the final norm.
        """
        vit = self.model
        B = x.shape[0]
        t = vit.patch_embed(x)  # (B, h, w, D) with dynamic_img_size, else (B, N, D)
        if masks is not None:
            n = t.shape[1] * t.shape[2] if t.ndim == 4 else t.shape[1]
            if masks.shape != (B, n):
                raise ValueError(f"masks must be (B, N) = ({B}, {n}) for {tuple(x.shape)} input, got {tuple(masks.shape)}")
            m = masks.reshape(*t.shape[:-1], 1).to(torch.bool)
            # torch.where keeps mask_token in the graph even when nothing is masked,
            # so DDP never sees it as an unused parameter.
            t = torch.where(m, self.mask_token.to(t.dtype).view(*([1] * (t.ndim - 1)), -1), t)
        t = vit._pos_embed(t)
        t = vit.patch_drop(t)
        t = vit.norm_pre(t)
        t = vit.blocks(t)
        t = vit.norm(t)
        npre = self.num_prefix_tokens
        return {"cls": t[:, 0], "reg": t[:, 1:npre], "patch": t[:, npre:]}


class ConvBackbone(Backbone):
    """A timm ConvNet; ``forward(x)`` -> ``{"cls": (B, D)}`` pooled features (no patch tokens)."""

    kind = "convnet"
    channels_last = False

    def shard_units(self) -> list[nn.Module]:
        return [m for n, m in self.model.named_children() if n.startswith(("layer", "stages"))]

    def use_channels_last(self) -> "ConvBackbone":
        """Weights and inputs in channels-last layout: oneDNN's (and cuDNN's) fast convolution path.

        Measured on the 2-core CPU (narrow ResNet-18, 32 px, batch 256): about 2x the img/s of the
        default layout, which makes oneDNN reorder every activation. The exported weights are made
        contiguous again (``export_backbone.backbone_state``), so readers see plain tensors.
        """
        self.model.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) images -> ``{"cls": (B, D)}``; ``masks`` must be None (ConvNets have no patches)."""
        if masks is not None:
            raise ValueError("a ConvNet backbone takes no patch masks")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return {"cls": self.model(x)}


def _set_uniform_drop_path(vit: nn.Module, rate: float) -> None:
    """Give every block the same drop-path rate (DINOv2's ``drop_path_uniform``)."""
    from timm.layers import DropPath

    for blk in vit.blocks:
        for name in ("drop_path1", "drop_path2", "drop_path"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(rate) if rate > 0 else nn.Identity())


def build_backbone(cfg: ModelConfig, img_size: int) -> Backbone:
    """Create the timm model ``cfg`` describes for ``img_size`` crops, wrapped (random init)."""
    meta = backbone_meta(cfg, img_size)
    extra = {"drop_path_rate": cfg.drop_path_rate} if cfg.drop_path_rate > 0 else {}
    try:
        model = create_timm_model(meta, **extra)  # drop_path_rate: training only, not in the export
    except BackboneFormatError as e:
        raise ConfigError(f"model: {e}") from None
    except TypeError as e:
        raise ConfigError(f"model: {cfg.name} does not take these options: {e}") from None
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        if cfg.drop_path_uniform and cfg.drop_path_rate > 0:
            _set_uniform_drop_path(model, cfg.drop_path_rate)
        return ViTBackbone(model, meta)
    return ConvBackbone(model, meta)


def model_patch_size(cfg: ModelConfig, img_size: int) -> int | None:
    """Patch size of the configured ViT (None for ConvNets), found without allocating weights."""
    if not is_vit_name(cfg.name):
        return None
    vit = _meta_model(cfg.name, timm_model_kwargs(cfg, img_size))
    ps = vit.patch_embed.patch_size
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


__all__ = ["Backbone", "ViTBackbone", "ConvBackbone", "build_backbone", "backbone_meta", "timm_model_kwargs",
           "model_patch_size", "is_vit_name"]
