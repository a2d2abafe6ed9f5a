"""Sinkhorn-Knopp teacher targets (SwAV / DINOv2), computed in the log domain.

Same algorithm as DINOv2's ``sinkhorn_knopp_teacher`` (normalise the whole
matrix, then ``n_iterations`` times: rows to 1/K, columns to 1/B; return
columns scaled to sum to 1), but every normalisation is a log-sum-exp that
subtracts the max before exponentiating. The reference exponentiates
``logits / temp`` directly, which overflows float32 to inf (then NaN) once a
logit exceeds ~88 x temp (3.5 at temp 0.04); here the result stays finite for
any finite input and equals the reference wherever the reference is finite.

Across workers, the totals and per-prototype row sums are all-reduced (max
then sum), and B is the number of samples over all workers, so every worker
computes its columns of the one global transport plan.
"""
from __future__ import annotations

import math

import torch

from ._dist import all_reduce_


def _global_logsumexp(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """logsumexp over ``dim`` (None = all) of a tensor split over workers along the other axis.

    Empty local parts contribute nothing (-inf max, zero sum).
    """
    if dim is None:
        m = x.max().reshape(1) if x.numel() else x.new_full((1,), float("-inf"))
    else:
        m = x.amax(dim=dim, keepdim=True) if x.shape[dim] else x.new_full(
            [1 if i == dim else s for i, s in enumerate(x.shape)], float("-inf"))
    m = all_reduce_(m.clone(), op="max")
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m_safe)
    s = s.sum().reshape(1) if dim is None else s.sum(dim=dim, keepdim=True)
    s = all_reduce_(s, op="sum")
    out = m_safe + torch.log(s)
    return out.reshape(()) if dim is None else out


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Balanced soft assignments of samples to prototypes.

    Args:
        teacher_logits: (B, K) prototype scores of this worker's B samples.
        teacher_temp: temperature dividing the logits.
        n_iterations: Sinkhorn iterations (DINOv2: 3).

    Returns:
        (B, K) float32 targets; each row sums to 1 and, over all workers, each
        prototype receives about B_total / K of the mass.
    """
    logq = (teacher_logits.float() / teacher_temp).t()  # (K, B): the paper's orientation
    K, b_local = logq.shape
    B = all_reduce_(torch.tensor([float(b_local)], device=logq.device)).item()
    log_k, log_b = math.log(K), math.log(max(B, 1.0))
    logq = logq - _global_logsumexp(logq, None)  # whole matrix sums to 1
    for _ in range(n_iterations):
        logq = logq - _global_logsumexp(logq, 1) - log_k  # each prototype row: 1/K (summed over workers)
        logq = logq - torch.logsumexp(logq, dim=0, keepdim=True) - log_b  # each sample column: 1/B
    return torch.exp(logq + log_b).t()


__all__ = ["sinkhorn_knopp"]
