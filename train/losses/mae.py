"""MAE: per-patch random masking and the pixel loss on masked patches (He et al. 2022).

- ``random_masking``: each image keeps ``int(L * (1 - mask_ratio))`` of its L patch
  tokens (default ratio 0.75), the ones with the lowest noise, as the authors' code:
  it returns the kept tokens, the binary mask (1 = removed) and the permutation that
  restores the original order after the decoder appends mask tokens.
  ``keep_unmasked`` does the same from a boolean mask the loader drew (exact resume:
  the loader's masks come from numpy seeded by (seed, epoch, rank, batch)).
- ``MAELoss``: mean squared error between predicted and true pixels of each patch,
  averaged over the masked patches only; with ``norm_pix_loss`` the target of each
  patch is its pixels normalised by their own mean and (unbiased) std (eps 1e-6).

Patch vectors follow the authors' ``patchify``: patch (i, j) in row-major order,
its pixels as (row, column, channel), i.e. (N, 3, H, W) -> (N, H/p * W/p, p*p*3).
"""
from __future__ import annotations

import torch
from torch import nn


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, L, p*p*3) with L = (H/p)(W/p), pixels of a patch as (row, col, channel)."""
    n, c, hh, ww = imgs.shape
    p = int(patch_size)
    if hh % p or ww % p:
        raise ValueError(f"image side {hh}x{ww} is not a multiple of patch_size {p}")
    h, w = hh // p, ww // p
    x = imgs.reshape(n, c, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, h * w, p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W) for a square grid; the inverse of ``patchify``."""
    n, length, _ = x.shape
    p, h = int(patch_size), int(round(length ** 0.5))
    if h * h != length:
        raise ValueError(f"unpatchify needs a square grid, got {length} patches")
    x = x.reshape(n, h, h, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, h * p, h * p)


def _mask_by_noise(x: torch.Tensor, noise: torch.Tensor, len_keep: int):
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    mask = torch.ones(x.shape[:2], device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    return x_kept, torch.gather(mask, 1, ids_restore), ids_restore


def random_masking(x: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None):
    """Keep a random ``int(L * (1 - mask_ratio))`` tokens of each image.

    Args:
        x: (N, L, D) patch tokens (without the class token).
        mask_ratio: fraction removed (MAE: 0.75).
        noise: optional (N, L) scores; the lowest are kept (default: uniform noise).
        generator: torch generator for the default noise.

    Returns:
        ``(x_kept (N, len_keep, D), mask (N, L) with 1 = removed, ids_restore (N, L))``.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"MAE mask_ratio must be in [0, 1), got {mask_ratio}")
    n, length, _ = x.shape
    if noise is None:
        noise = torch.rand(n, length, device=x.device, generator=generator)
    return _mask_by_noise(x, noise, int(length * (1 - mask_ratio)))


def keep_unmasked(x: torch.Tensor, masks: torch.Tensor):
    """``random_masking`` for a given (N, L) bool mask (True = removed, same count in every row).

    Returns ``(x_kept (N, L - n_masked, D) in patch order, mask (N, L) float, ids_restore (N, L))``.
    """
    counts = masks.sum(dim=1)
    if masks.shape != x.shape[:2] or (counts != counts[0]).any():
        raise ValueError(f"keep_unmasked needs (N, L) = {tuple(x.shape[:2])} masks with equal masked "
                         f"counts per row, got {tuple(masks.shape)} with counts {counts.unique().tolist()}")
    return _mask_by_noise(x, masks.to(x.dtype), x.shape[1] - int(counts[0]))


class MAELoss(nn.Module):
    """Pixel MSE on masked patches; per-patch normalised targets by default (``norm_pix_loss``)."""

    def __init__(self, patch_size: int, norm_pix_loss: bool = True, eps: float = 1e-6):
        super().__init__()
        self.patch_size = int(patch_size)
        self.norm_pix_loss = norm_pix_loss
        self.eps = float(eps)

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, L, p*p*3) regression targets."""
        t = patchify(imgs.float(), self.patch_size)
        if self.norm_pix_loss:
            t = (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + self.eps) ** 0.5
        return t

    def forward(self, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Args:
            pred: (N, L, p*p*3) decoder predictions of every patch.
            imgs: (N, 3, H, W) input images (the loader's normalised crops).
            mask: (N, L), 1 (or True) = masked; only these patches count.

        Returns:
            scalar float32 ``sum(mean_pixels (pred - target)^2 * mask) / sum(mask)``.
        """
        target = self.target(imgs)
        if pred.shape != target.shape:
            raise ValueError(f"MAE prediction {tuple(pred.shape)} does not match the patch targets "
                             f"{tuple(target.shape)}")
        m = mask.float()
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        return (per_patch * m).sum() / m.sum().clamp(min=1.0)


__all__ = ["MAELoss", "patchify", "unpatchify", "random_masking", "keep_unmasked"]
