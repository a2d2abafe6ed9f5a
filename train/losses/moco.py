"""MoCo's InfoNCE: v2 with a queue of negatives (He et al. 2020, Chen et al. 2020), v3 in-batch (Chen et al. 2021).

v2 (eq. 1 of MoCo): for a query q, its positive key k+ (the momentum encoder's view
of the same image) and the K keys of earlier batches in the queue::

    L_q = -log( exp(q.k+ / T) / (exp(q.k+ / T) + sum_{i<K} exp(q.k_i / T)) )

averaged over the worker's queries. After the loss, this step's keys of all workers
(gathered, rank order) replace the oldest queue entries, so every worker holds the
same queue; keys of a step are never negatives of that step.

v3 (Algorithm 1): ``ctr(q, k) = 2T * CE(q @ k_all.T / T, own index)`` with the keys
of the whole global batch as negatives, symmetrised: ``ctr(q1, k2) + ctr(q2, k1)``.

Queries and keys are L2-normalised here; keys are targets (stop-gradient).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._dist import gather_no_grad, rank


class MoCoV2Loss(nn.Module):
    """InfoNCE against a FIFO queue of keys (queue 4096-65536; MoCo v2: 65536, temperature 0.2).

    Buffers (saved in checkpoints, so resume continues with the same negatives):
    ``queue`` (queue_size, dim) of L2-normalised keys, ``queue_ptr`` (1,) next row to
    overwrite. The initial queue is random unit vectors from a fixed seed (identical on
    every worker, as MoCo's DDP-broadcast buffer is).
    """

    def __init__(self, dim: int, queue_size: int = 65536, temperature: float = 0.2, seed: int = 0):
        super().__init__()
        if queue_size < 1 or dim < 1:
            raise ValueError(f"MoCo v2 needs queue_size >= 1 and dim >= 1, got {queue_size} and {dim}")
        if temperature <= 0:
            raise ValueError(f"MoCo temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim, generator=g), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def forward(self, q: torch.Tensor, k: torch.Tensor, update_queue: bool = True) -> torch.Tensor:
        """Mean InfoNCE of this worker's queries, then (by default) enqueue the keys.

        Args:
            q: (B, D) query projections (online encoder, one view).
            k: (B, D) key projections of the same images (momentum encoder, other view).
            update_queue: enqueue the keys of all workers after computing the loss.

        Returns:
            scalar float32 loss.
        """
        if q.shape != k.shape or q.shape[1] != self.queue.shape[1]:
            raise ValueError(f"MoCo v2 expects q and k of shape (B, {self.queue.shape[1]}), got "
                             f"{tuple(q.shape)} and {tuple(k.shape)}")
        qn = F.normalize(q.float(), dim=1)
        kn = F.normalize(k.detach().float(), dim=1)
        l_pos = (qn * kn).sum(dim=1, keepdim=True)  # (B, 1)
        l_neg = qn @ self.queue.clone().t()  # (B, K); clone: the enqueue below must not touch autograd's copy
        logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
        if update_queue:
            self.dequeue_and_enqueue(kn)
        return loss

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Write the (B, D) keys of all workers (gathered, rank order) over the oldest queue rows."""
        keys = F.normalize(gather_no_grad(keys.float()), dim=1)
        size = self.queue.shape[0]
        n = keys.shape[0]
        if n >= size:  # a global batch larger than the queue: keep its last rows
            self.queue.copy_(keys[-size:])
            self.queue_ptr.zero_()
            return
        ptr = int(self.queue_ptr.item())
        idx = (ptr + torch.arange(n, device=keys.device)) % size
        self.queue[idx] = keys
        self.queue_ptr[0] = (ptr + n) % size


class MoCoV3Loss(nn.Module):
    """MoCo v3's symmetric in-batch InfoNCE, scaled by 2T as in the paper (temperature 0.2 for ViT,
    1.0 in the ResNet recipe)."""

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"MoCo temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def contrastive(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``2T * CE(q @ k_all.T / T)``: (B, D) queries vs the (W*B, D) keys of all workers."""
        qn = F.normalize(q.float(), dim=1)
        keys = F.normalize(gather_no_grad(k.float()), dim=1)
        logits = qn @ keys.t() / self.temperature  # (B, W*B)
        labels = torch.arange(len(q), device=q.device) + rank() * len(q)
        return F.cross_entropy(logits, labels) * (2 * self.temperature)

    def forward(self, q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
        """``ctr(q1, k2) + ctr(q2, k1)``.

        Args:
            q1, q2: (B, D) predictor outputs of the online encoder for views 1 and 2.
            k1, k2: (B, D) momentum-encoder projections of views 1 and 2 (targets).

        Returns:
            scalar float32 loss.
        """
        return self.contrastive(q1, k2) + self.contrastive(q2, k1)


__all__ = ["MoCoV2Loss", "MoCoV3Loss"]
