"""ViT backbone: a timm VisionTransformer by name, wrapped for masked-image SSL.

The wrapper adds what DINOv2/iBOT need and timm lacks: a learned ``mask_token``
that replaces the embeddings of masked patches (before position embeddings are
added, as in DINOv2), and an output split into CLS, register and patch tokens.
The timm model inside (``Backbone.vit``) keeps timm's own parameter names, so
its state dict loads into ``timm.create_model(name, **kwargs)`` unchanged
(see ``webcurate.train.export``).

Crops of any size multiple of the patch size are accepted (``dynamic_img_size``:
position embeddings are resampled bicubically for local crops, a no-op for
the global size).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import ModelConfig


def timm_model_kwargs(cfg: ModelConfig, img_size: int) -> dict[str, Any]:
    """The ``timm.create_model`` keyword arguments for ``cfg`` at ``img_size``.

    Only architecture options that differ from the timm variant are passed;
    ``num_classes=0`` and ``global_pool="token"`` make the plain timm model
    return the normalised CLS token, the embedding the rest of webcurate uses.
    """
    kw: dict[str, Any] = {
        "num_classes": 0,
        "global_pool": "token",
        "class_token": True,
        "dynamic_img_size": True,
        "img_size": int(cfg.img_size or img_size),
    }
    for name in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "reg_tokens"):
        v = getattr(cfg, name)
        if v is not None:
            kw[name] = v
    # None must reach timm too: it is how LayerScale is switched off for archs that enable it.
    kw["init_values"] = cfg.layerscale
    kw.update(cfg.timm_kwargs or {})
    return kw


def create_vit(model_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(model_name, **kwargs)`` with errors that name the model."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    try:
        vit = timm.create_model(model_name, pretrained=False, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            from webcurate.shards.errors import ConfigError

            raise ConfigError(f"model.name={model_name!r} is not a timm model; see timm.list_models('vit_*')") from e
        raise
    if not isinstance(vit, VisionTransformer):
        from webcurate.shards.errors import ConfigError

        raise ConfigError(f"model.name={model_name!r} is a {type(vit).__name__}, not a timm VisionTransformer")
    return vit


class Backbone(nn.Module):
    """A timm ViT that takes an optional patch mask and returns CLS, register and patch tokens.

    Attributes: ``vit`` (the timm model), ``mask_token`` (1, D), ``embed_dim`` D,
    ``patch_size`` P, ``num_reg_tokens`` R, and ``model_name``/``model_kwargs``
    to rebuild the bare timm model.
    """

    def __init__(self, vit: nn.Module, model_name: str, model_kwargs: dict[str, Any]):
        super().__init__()
        self.vit = vit
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs)
        self.embed_dim = int(vit.embed_dim)
        ps = vit.patch_embed.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.num_reg_tokens = int(getattr(vit, "num_reg_tokens", 0))
        if vit.cls_token is None:
            raise ValueError(f"{model_name} has no class token; DINO needs one")
        # Zeros as in DINOv2: a masked patch starts as "no content" and the token learns from there.
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Encode images, replacing masked patch embeddings by the mask token.

        Args:
            x: (B, 3, H, W) normalised images, H and W multiples of ``patch_size``.
            masks: optional (B, N) bool, N = (H/P)*(W/P); True = masked patch.

        Returns:
            dict with ``cls`` (B, D), ``reg`` (B, R, D) and ``patch`` (B, N, D),
            all after the final norm.
        """
        vit = self.vit
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


def _set_uniform_drop_path(vit: nn.Module, rate: float) -> None:
    """Give every block the same drop-path rate (DINOv2's ``drop_path_uniform``)."""
    from timm.layers import DropPath

    for blk in vit.blocks:
        for name in ("drop_path1", "drop_path2", "drop_path"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(rate) if rate > 0 else nn.Identity())


def build_backbone(cfg: ModelConfig, img_size: int) -> Backbone:
    """Create the timm ViT described by ``cfg`` for ``img_size`` global crops, wrapped."""
    kwargs = timm_model_kwargs(cfg, img_size)
    vit = create_vit(cfg.name, {**kwargs, "drop_path_rate": cfg.drop_path_rate})
    if cfg.drop_path_uniform and cfg.drop_path_rate > 0:
        _set_uniform_drop_path(vit, cfg.drop_path_rate)
    # drop_path_rate is a training-only setting: the exported architecture leaves it out.
    return Backbone(vit, cfg.name, kwargs)


def model_patch_size(cfg: ModelConfig, img_size: int) -> int:
    """Patch size of the configured model, found without allocating weights."""
    with torch.device("meta"):
        vit = create_vit(cfg.name, timm_model_kwargs(cfg, img_size))
    ps = vit.patch_embed.patch_size
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


__all__ = ["Backbone", "build_backbone", "timm_model_kwargs", "create_vit", "model_patch_size"]
