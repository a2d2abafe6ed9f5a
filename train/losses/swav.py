"""SwAV: swapped prediction of Sinkhorn-Knopp codes over prototypes (Caron et al. 2020), multi-crop.

Each crop's embedding z (L2-normalised) is scored against K prototypes c_k
(``scores = z @ C.T``). Codes q come from the high-resolution ("assign") crops
only, as a balanced soft assignment (Sinkhorn-Knopp, epsilon 0.05, 3 iterations;
our log-domain-safe ``sinkhorn.sinkhorn_knopp``, balanced over all workers). Every
other crop v predicts them::

    l(z_v, q_i) = -sum_k q_i^(k) log softmax(z_v . c / T)^(k)
    loss = mean_{i in assign} mean_{v != i} mean_batch l(z_v, q_i)

(the paper sums the terms; the authors' code averages them, as here).

Queue (``queue_length > 0``, for small batches): the assign crops' embeddings of the
last ``queue_length`` samples of this worker are kept and scored with the *current*
prototypes, so Sinkhorn-Knopp balances over queue + batch (of all workers); only the
batch's codes are used. As in the authors' code the queue takes part once it is full.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .sinkhorn import sinkhorn_knopp


class SwAVLoss(nn.Module):
    """Swapped-prediction loss with Sinkhorn codes (temperature 0.1, epsilon 0.05, 3 iterations).

    Buffers (checkpointed): ``queue`` (n_assign, queue_length, embed_dim) and
    ``queue_filled`` (1,), rows written so far (capped at queue_length).
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_epsilon: float = 0.05, sinkhorn_iterations: int = 3,
                 n_assign: int = 2, queue_length: int = 0, embed_dim: int | None = None):
        super().__init__()
        if temperature <= 0 or sinkhorn_epsilon <= 0:
            raise ValueError(f"SwAV temperature and sinkhorn_epsilon must be > 0, got {temperature}, "
                             f"{sinkhorn_epsilon}")
        if n_assign < 1:
            raise ValueError(f"SwAV n_assign must be >= 1, got {n_assign}")
        if queue_length and not embed_dim:
            raise ValueError("SwAV with a queue needs embed_dim (the width of the embeddings it stores)")
        self.temperature = float(temperature)
        self.epsilon = float(sinkhorn_epsilon)
        self.iterations = int(sinkhorn_iterations)
        self.n_assign = int(n_assign)
        self.queue_length = int(queue_length)
        self.register_buffer("queue", torch.zeros(n_assign, self.queue_length, int(embed_dim or 0)))
        self.register_buffer("queue_filled", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def codes(self, scores: torch.Tensor, assign: int, prototypes: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) scores of assign crop ``assign`` -> (B, K) Sinkhorn codes (rows sum to 1)."""
        out = scores.detach().float()
        if self.queue_length and int(self.queue_filled.item()) >= self.queue_length:
            queued = self.queue[assign] @ prototypes.detach().float().t()  # (queue_length, K)
            out = torch.cat([queued, out])
        return sinkhorn_knopp(out, self.epsilon, self.iterations)[-len(scores):]

    @torch.no_grad()
    def enqueue(self, embeddings: Sequence[torch.Tensor]) -> None:
        """Push the (B, D) embeddings of each assign crop in front of its queue (oldest rows drop)."""
        b = embeddings[0].shape[0]
        for i, e in enumerate(embeddings[:self.n_assign]):
            self.queue[i].copy_(torch.cat([e.detach().float(), self.queue[i]])[:self.queue_length])
        self.queue_filled.add_(b).clamp_(max=self.queue_length)

    def forward(self, scores: Sequence[torch.Tensor], embeddings: Sequence[torch.Tensor] | None = None,
                prototypes: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            scores: per crop, (B, K) prototype scores ``z @ C.T``; the first ``n_assign`` are the
                high-resolution crops that give codes, the rest (local crops) only predict.
            embeddings: with a queue, the (B, D) normalised embeddings of the assign crops (stored).
            prototypes: with a queue, the (K, D) prototype matrix C (scores the stored embeddings).

        Returns:
            scalar float32 loss.
        """
        n_crops = len(scores)
        if n_crops < 2 or n_crops < self.n_assign:
            raise ValueError(f"SwAV needs >= 2 crops and at least n_assign={self.n_assign}, got {n_crops}")
        if self.queue_length and (embeddings is None or prototypes is None):
            raise ValueError("SwAV with a queue needs the assign crops' embeddings and the prototypes")
        log_p = [F.log_softmax(s.float() / self.temperature, dim=1) for s in scores]
        total = 0.0
        for i in range(self.n_assign):
            q = self.codes(scores[i], i, prototypes)
            sub = sum(-(q * log_p[v]).sum(dim=1).mean() for v in range(n_crops) if v != i)
            total = total + sub / (n_crops - 1)
        if self.queue_length:
            self.enqueue(embeddings)
        return total / self.n_assign


__all__ = ["SwAVLoss"]
