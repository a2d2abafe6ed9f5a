"""VICReg: variance-invariance-covariance regularisation (Bardes et al. 2022, eq. 1-6 and Algorithm 1).

For two (n, d) batches of embeddings Z, Z' of the same images::

    s(Z, Z')  = mean_{i,k} (z_ik - z'_ik)^2                    invariance (Algorithm 1's mse_loss)
    v(Z)      = 1/d sum_j max(0, gamma - sqrt(Var(z_.j) + eps))  variance (unbiased Var, gamma = 1)
    c(Z)      = 1/d sum_{i != j} C(Z)_ij^2,  C(Z) = (Z - mean)^T (Z - mean) / (n - 1)
    loss      = lambda s(Z, Z') + mu [v(Z) + v(Z')] + nu [c(Z) + c(Z')]

with lambda = mu = 25, nu = 1 (eq. 6). The authors' repository halves the variance
sum (``std_loss / 2``): ``variance_weight=12.5`` reproduces it. All three terms are
statistics of the *global* batch: the embeddings of all workers are gathered
(gradient-preserving), so every worker computes the same loss as one process on the
concatenated batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._dist import gather_with_grad, require_batch_statistics


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """(d, d) -> (d*d - d,) the off-diagonal entries."""
    d = m.shape[0]
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


def variance_term(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """(n, d) -> scalar ``mean_j relu(gamma - sqrt(var_j + eps))`` (hinge on each dimension's std)."""
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(gamma - std).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """(n, d) -> scalar ``sum of squared off-diagonal covariances / d``."""
    n, d = z.shape
    zc = z - z.mean(dim=0)
    cov = zc.t() @ zc / (n - 1)
    return _off_diagonal(cov).pow(2).sum() / d


class VICRegLoss(nn.Module):
    """VICReg over the global batch (weights 25 / 25 / 1, variance target gamma = 1)."""

    def __init__(self, invariance_weight: float = 25.0, variance_weight: float = 25.0,
                 covariance_weight: float = 1.0, gamma: float = 1.0, eps: float = 1e-4,
                 gather_distributed: bool = True):
        super().__init__()
        self.invariance_weight = float(invariance_weight)
        self.variance_weight = float(variance_weight)
        self.covariance_weight = float(covariance_weight)
        self.gamma, self.eps = float(gamma), float(eps)
        self.gather_distributed = gather_distributed

    def terms(self, z_a: torch.Tensor, z_b: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted terms ``invariance``, ``variance`` (v(Z) + v(Z')), ``covariance`` (c(Z) + c(Z'))."""
        if z_a.shape != z_b.shape or z_a.dim() != 2:
            raise ValueError(f"VICReg expects two (B, D) batches of equal shape, got {tuple(z_a.shape)} "
                             f"and {tuple(z_b.shape)}")
        if self.gather_distributed:
            z_a, z_b = gather_with_grad(z_a), gather_with_grad(z_b)
        require_batch_statistics(z_a.shape[0], "VICReg")
        z_a, z_b = z_a.float(), z_b.float()
        return {
            "invariance": F.mse_loss(z_a, z_b),
            "variance": variance_term(z_a, self.gamma, self.eps) + variance_term(z_b, self.gamma, self.eps),
            "covariance": covariance_term(z_a) + covariance_term(z_b),
        }

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """Args:
            z_a, z_b: (B, D) expander outputs of views a and b on this worker.

        Returns:
            scalar float32 loss of the global batch (the same on every worker).

        Raises:
            ValueError: the global batch holds a single image (no variance).
        """
        t = self.terms(z_a, z_b)
        return (self.invariance_weight * t["invariance"] + self.variance_weight * t["variance"]
                + self.covariance_weight * t["covariance"])


__all__ = ["VICRegLoss", "variance_term", "covariance_term"]
