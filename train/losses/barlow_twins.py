"""Barlow Twins: redundancy reduction on the cross-correlation matrix (Zbontar et al. 2021, eq. 1-2).

Each embedding dimension is batch-normalised over the *global* batch (mean 0,
biased variance 1, eps 1e-5, no affine: the authors' ``BatchNorm1d(affine=False)``
made ``SyncBatchNorm`` under DDP), then::

    C_ij = 1/N sum_b za_bi zb_bj                               (D, D) cross-correlation
    L_BT = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2,   lambda = 5e-3

The embeddings of all workers are gathered (gradient-preserving), so every worker
computes the loss of the concatenated batch.
"""
from __future__ import annotations

import torch
from torch import nn

from ._dist import gather_with_grad, require_batch_statistics


def _batch_norm(z: torch.Tensor, eps: float) -> torch.Tensor:
    """(N, D) -> (N, D) per-dimension ``(z - mean) / sqrt(biased var + eps)``."""
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins loss with batch-norm over the global batch (lambda 5e-3)."""

    def __init__(self, lambda_: float = 5e-3, eps: float = 1e-5, gather_distributed: bool = True):
        super().__init__()
        self.lambda_ = float(lambda_)
        self.eps = float(eps)
        self.gather_distributed = gather_distributed

    def cross_correlation(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """(B, D), (B, D) of this worker -> (D, D) cross-correlation of the global batch."""
        if z_a.shape != z_b.shape or z_a.dim() != 2:
            raise ValueError(f"Barlow Twins expects two (B, D) batches of equal shape, got "
                             f"{tuple(z_a.shape)} and {tuple(z_b.shape)}")
        if self.gather_distributed:
            z_a, z_b = gather_with_grad(z_a), gather_with_grad(z_b)
        n = z_a.shape[0]
        require_batch_statistics(n, "Barlow Twins")
        return _batch_norm(z_a.float(), self.eps).t() @ _batch_norm(z_b.float(), self.eps) / n

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """Args:
            z_a, z_b: (B, D) projector outputs of views a and b on this worker.

        Returns:
            scalar float32 loss of the global batch (the same on every worker).

        Raises:
            ValueError: the global batch holds a single image (no batch statistics).
        """
        c = self.cross_correlation(z_a, z_b)
        on_diag = (torch.diagonal(c) - 1).pow(2).sum()
        off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
        return on_diag + self.lambda_ * off_diag


__all__ = ["BarlowTwinsLoss"]
