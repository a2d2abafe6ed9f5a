"""MAE: encode the visible 25 % of a ViT's patches, reconstruct the rest with a light decoder.

Encoder: the timm ViT's patch embedding and position embeddings on the whole
grid, then only the kept patch tokens (plus CLS) through its blocks. Decoder:
a linear map to ``mae.decoder_dim``, mask tokens in the removed places, learned
position embeddings, ``mae.decoder_depth`` timm transformer blocks, and a
linear head to the p*p*3 pixels of every patch. The loss
(``train/losses/mae.py``) is the MSE on removed patches against per-patch
normalised pixels. Only the encoder is exported.

Every global crop the loader yields is one training image (the MAE recipe's
loader gives crops and flips only). Masks are drawn from torch's RNG, which
checkpoints restore per rank, so resume stays exact.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..losses import MAELoss, random_masking
from .base import Objective, SSLModel, StepLoss, to_device


class MAEDecoder(nn.Module):
    """(N, 1 + L_keep, D) encoded tokens + ids_restore -> (N, L, p*p*3) pixel predictions."""

    def __init__(self, embed_dim: int, n_patches: int, patch_size: int, dim: int, depth: int, heads: int):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n_patches, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * 3)

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        n, length = ids_restore.shape
        cls, kept = x[:, :1], x[:, 1:]
        fill = self.mask_token.expand(n, length - kept.shape[1], -1)
        full = torch.cat([kept, fill], dim=1)
        full = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
        x = torch.cat([cls, full], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.pred(x[:, 1:])


class MAEModel(SSLModel):
    """ViT backbone + ``decoder``."""

    def forward(self, images: torch.Tensor, noise: torch.Tensor, mask_ratio: float) -> dict[str, torch.Tensor]:
        """Args:
            images: (N, 3, G, G) crops; noise: (N, L) masking scores (lowest kept); mask_ratio: removed share.

        Returns:
            ``pred`` (N, L, p*p*3), ``mask`` (N, L) 1 = removed, ``cls`` (N, D) CLS of the visible tokens.
        """
        bb = self.backbone
        vit = bb.model
        t = vit._pos_embed(vit.patch_embed(images))  # (N, prefix + L, D), positions of the whole grid
        npre = bb.num_prefix_tokens
        prefix, patches = t[:, :npre], t[:, npre:]
        kept, mask, ids_restore = random_masking(patches, mask_ratio, noise=noise)
        x = vit.norm(vit.blocks(vit.norm_pre(torch.cat([prefix, kept], dim=1))))
        # The decoder sees CLS and the kept patches (register tokens stay in the encoder).
        dec_in = torch.cat([x[:, :1], x[:, npre:]], dim=1)
        return {"pred": self.heads["decoder"](dec_in, ids_restore), "mask": mask, "cls": x[:, 0]}


def build_mae_model(cfg, backbone: nn.Module) -> MAEModel:
    m = cfg.mae
    side = cfg.loader.global_size // backbone.patch_size
    heads = nn.ModuleDict({"decoder": MAEDecoder(backbone.embed_dim, side * side, backbone.patch_size,
                                                 m.decoder_dim, m.decoder_depth, m.decoder_heads)})
    # MAE replaces masked tokens by dropping them: the backbone's mask token takes no part.
    backbone.mask_token.requires_grad_(False)
    return MAEModel(backbone, heads)


class MAEObjective(Objective):
    """Random 75 % masking per image and the masked-pixel loss."""

    def __init__(self, cfg, patch_size: int):
        super().__init__(cfg)
        self.loss_fn = MAELoss(patch_size, cfg.mae.norm_pix_loss)
        self.patch_size = patch_size

    def prepare(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        images = to_device(batch["global_crops"], device)
        side = images.shape[-1] // self.patch_size
        noise = torch.rand(images.shape[0], side * side).to(device)  # CPU RNG: checkpointed per rank
        return {"images": images, "noise": noise, "mask_ratio": self.cfg.mae.mask_ratio}

    def loss(self, out: dict[str, torch.Tensor], targets: Any, inputs: dict[str, Any], values: Any) -> StepLoss:
        total = self.loss_fn(out["pred"], inputs["images"], out["mask"])
        cls = out["cls"].detach()
        # Crop-major rows: two halves are two views of the same images (one view: compare with itself).
        views = tuple(cls.chunk(2)) if cls.shape[0] >= 2 and cls.shape[0] % 2 == 0 else (cls, cls)
        return StepLoss(total, {}, views)


__all__ = ["MAEModel", "MAEObjective", "MAEDecoder", "build_mae_model"]
