"""NT-Xent, SimCLR's normalised temperature-scaled cross-entropy (Chen et al. 2020, eq. 1).

For the 2N projections of N images (two views each) and cosine similarity
``sim``, anchor i with positive j (the other view of the same image) costs::

    l(i, j) = -log( exp(sim(z_i, z_j) / T) / sum_{k != i} exp(sim(z_i, z_k) / T) )

and the loss is the mean of l over all 2N anchors. Negatives are the other
2N - 2 projections of the *global* batch: every worker gathers all workers'
projections (gradient-preserving, see ``_dist``) and scores its own 2B anchors
against them, so the mean over workers of the per-worker loss equals the
single-process loss on the concatenated batch (and DDP's averaged gradients
equal its gradients).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._dist import gather_with_grad, rank, require_batch_statistics


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent with negatives gathered across workers (temperature 0.1-0.5; paper 0.5 at
    batch 256 on CIFAR, 0.1 at large batches)."""

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"NT-Xent temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed

    def forward(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        """Mean NT-Xent of this worker's 2B anchors against the global batch.

        Args:
            z0: (B, D) projections of view 0 of this worker's B images.
            z1: (B, D) projections of view 1 of the same images (row b pairs with z0[b]).

        Returns:
            scalar float32 loss.

        Raises:
            ValueError: the global batch holds a single image (no negatives).
        """
        if z0.shape != z1.shape or z0.dim() != 2:
            raise ValueError(f"NT-Xent expects two (B, D) views of equal shape, got {tuple(z0.shape)} "
                             f"and {tuple(z1.shape)}")
        B = z0.shape[0]
        q0, q1 = F.normalize(z0.float(), dim=1), F.normalize(z1.float(), dim=1)
        k0 = gather_with_grad(q0) if self.gather_distributed else q0
        k1 = gather_with_grad(q1) if self.gather_distributed else q1
        N = k0.shape[0]
        require_batch_statistics(N, "NT-Xent (SimCLR)")
        keys = torch.cat([k0, k1])  # (2N, D): view 0 of all images, then view 1
        anchors = torch.cat([q0, q1])  # (2B, D)
        logits = anchors @ keys.t() / self.temperature  # (2B, 2N)
        offset = rank() * B if self.gather_distributed else 0
        own = torch.arange(B, device=z0.device) + offset  # global index of this worker's images
        self_idx = torch.cat([own, own + N])  # each anchor's own column
        pos_idx = torch.cat([own + N, own])  # the other view of the same image
        logits = logits.masked_fill(
            torch.zeros_like(logits, dtype=torch.bool).scatter_(1, self_idx[:, None], True), float("-inf"))
        return F.cross_entropy(logits, pos_idx)


__all__ = ["NTXentLoss"]
