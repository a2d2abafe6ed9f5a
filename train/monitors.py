"""Collapse monitors computed from tensors the step already has (no extra forward).

DINO fails in two ways: every image maps to the same prototype (the teacher's
*batch-mean* distribution concentrates: KL to uniform grows towards log K), or
every output becomes uniform (each teacher *row* approaches log K entropy and
teaches nothing). Backbone collapse shows as a vanishing spread of the
normalised embeddings.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def teacher_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean per-row entropy (nats) of (B, K) teacher targets; log K = uniform rows."""
    p = probs.float()
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()


@torch.no_grad()
def marginal_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the batch-mean of (B, K) teacher targets; near 0 = one prototype wins."""
    m = probs.float().mean(0)
    return -(m * torch.log(m.clamp_min(1e-12))).sum()


@torch.no_grad()
def kl_to_uniform(probs: torch.Tensor) -> torch.Tensor:
    """KL(batch-mean of (B, K) targets || uniform) = log K - marginal entropy."""
    return math.log(probs.shape[-1]) - marginal_entropy(probs)


@torch.no_grad()
def embedding_std(x: torch.Tensor) -> torch.Tensor:
    """Std over the batch of L2-normalised (B, D) embeddings, mean over dims, times sqrt(D).

    About 1 for well-spread embeddings, 0 when all images embed alike.
    """
    if x.shape[0] < 2:
        return x.new_tensor(float("nan"))
    z = F.normalize(x.float(), dim=-1)
    return z.std(0).mean() * math.sqrt(z.shape[-1])


def collapse_monitors(teacher_probs: torch.Tensor, student_cls: torch.Tensor) -> dict[str, torch.Tensor]:
    """All monitors of one step: ``teacher_entropy``, ``teacher_marginal_entropy``,
    ``kl_to_uniform`` (from (B, K) targets) and ``embedding_std`` (from (B, D) CLS)."""
    return {
        "teacher_entropy": teacher_entropy(teacher_probs),
        "teacher_marginal_entropy": marginal_entropy(teacher_probs),
        "kl_to_uniform": kl_to_uniform(teacher_probs),
        "embedding_std": embedding_std(student_cls),
    }


__all__ = ["teacher_entropy", "marginal_entropy", "kl_to_uniform", "embedding_std", "collapse_monitors"]
