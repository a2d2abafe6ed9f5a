"""BYOL's normalised-MSE loss (Grill et al. 2020, eq. 2), symmetrised.

For the online network's prediction q of one view and the target network's
projection z' of the other view::

    L(q, z') = || q/||q|| - z'/||z'|| ||^2 = 2 - 2 <q, z'> / (||q|| ||z'||)

averaged over the batch; the symmetric loss sums both directions (view 1
predicts view 2 and view 2 predicts view 1). Targets are stop-gradient (the EMA
target network gets no gradient). A per-sample loss: nothing to gather across
workers (DDP's gradient averaging already gives the global-batch mean).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(B, D) predictions, (B, D) targets -> scalar ``mean_b (2 - 2 cos(p_b, z_b))``; z is detached."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()


class BYOLLoss(nn.Module):
    """Symmetric BYOL loss ``L(p1, z2) + L(p2, z1)`` (range [0, 8])."""

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Args:
            p1, p2: (B, D) online predictions of views 1 and 2.
            z1, z2: (B, D) target-network projections of views 1 and 2 (stop-gradient).

        Returns:
            scalar float32 loss.
        """
        return normalized_mse(p1, z2) + normalized_mse(p2, z1)


__all__ = ["BYOLLoss", "normalized_mse"]
