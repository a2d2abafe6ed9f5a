"""SimSiam's symmetric negative cosine with stop-gradient (Chen & He 2021, eq. 1-3).

``D(p, z) = -cos(p, stopgrad(z))`` and ``L = D(p1, z2)/2 + D(p2, z1)/2`` where
p are predictor outputs and z projector outputs of the *same* network (no EMA
branch: the stop-gradient alone prevents collapse). Range [-1, 1]; -1 is
perfect agreement. A per-sample loss: nothing to gather across workers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SimSiamLoss(nn.Module):
    """``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``, batch mean."""

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Args:
            p1, p2: (B, D) predictor outputs of views 1 and 2.
            z1, z2: (B, D) projector outputs of views 1 and 2 (detached here).

        Returns:
            scalar float32 loss.
        """
        d12 = -F.cosine_similarity(p1.float(), z2.detach().float(), dim=-1).mean()
        d21 = -F.cosine_similarity(p2.float(), z1.detach().float(), dim=-1).mean()
        return 0.5 * d12 + 0.5 * d21


__all__ = ["SimSiamLoss"]
