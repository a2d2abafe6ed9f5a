"""KoLeo regulariser (Sablayrolles et al. 2018), as DINOv2's ``KoLeoLoss``.

``-mean_i log(||x_i - x_nn(i)|| + eps)`` over L2-normalised vectors, where
nn(i) is the nearest other vector in the batch. It spreads embeddings
uniformly. A batch of one has no neighbour: the reference then measures the
distance of a vector to itself (a meaningless ~18 with a NaN-prone gradient);
here the loss is 0 with a zero gradient, so a worker that ends up with one
image never poisons training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo loss of a (B, D) batch; scalar float32 (0 when B < 2)."""
    if x.shape[0] < 2:
        return x.float().sum() * 0.0  # keeps the graph (DDP) with a zero gradient
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), eps=eps, p=2, dim=-1)
        with torch.no_grad():  # argmax has no gradient: the neighbour search need not be tracked
            dots = x @ x.t()
            dots.fill_diagonal_(-1)
            nn_idx = dots.argmax(dim=1)
        d = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)
        return -torch.log(d + eps).mean()


__all__ = ["koleo_loss"]
