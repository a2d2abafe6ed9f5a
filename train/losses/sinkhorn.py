"""Sinkhorn-Knopp teacher targets (SwAV / DINOv2), computed in the log domain.

Same algorithm as DINOv2's ``sinkhorn_knopp_teacher`` (normalise the whole
matrix, then ``n_iterations`` times: rows to 1/K, columns to 1/B; return
columns scaled to sum to 1), but the global max is subtracted before
exponentiating. The reference exponentiates ``logits / temp`` directly, which
overflows float32 to inf (then NaN) once a logit exceeds ~88 x temp (3.5 at
temp 0.04). The shift is a constant factor that the first normalisation
cancels, so the result equals the reference wherever the reference is finite.

Two paths, chosen by the spread of ``logits / temp`` over all workers:

- spread <= 60 (the usual case: a weight-normalised head gives logits in
  [-1, 1] x gain): exponentiate once and normalise in place, as the reference;
  nothing can underflow (exp(-60) / (B K) stays far above float32's tiny);
- wider: every normalisation becomes a log-sum-exp (max subtracted first), so
  even prototypes or samples far below the max keep finite, exact weights
  where a plain exp would flush them to 0 and divide 0 by 0.

Across workers, the totals and per-prototype row sums are all-reduced (max
then sum), and B is the number of samples over all workers, so every worker
computes its columns of the one global transport plan.
"""
from __future__ import annotations

import math

import torch

from ._dist import all_reduce_


_FAST_SPREAD = 60.0  # max - min of logits / temp below which a single exp cannot underflow


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
    x = teacher_logits.float()
    b_local, K = x.shape
    # One all_reduce for the sample count and the global max / min (max of -min).
    stats = torch.tensor([float(b_local), float("-inf"), float("-inf")], device=x.device)
    if x.numel():
        stats[1], stats[2] = x.max(), -x.min()
    counts = all_reduce_(stats[:1].clone())
    hi_lo = all_reduce_(stats[1:].clone(), op="max")
    B = counts.item()
    hi, spread = hi_lo[0], (hi_lo[0] + hi_lo[1]) / teacher_temp
    if B == 0:
        return x.new_zeros(x.shape)
    if spread.item() <= _FAST_SPREAD:
        q = ((x - hi) / teacher_temp).exp_().t()  # (K, B); the shift cancels in the first normalisation
        q /= all_reduce_(q.sum().reshape(1))
        for _ in range(n_iterations):
            q /= all_reduce_(q.sum(dim=1, keepdim=True))  # each prototype row: 1/K over all workers
            q /= K
            q /= q.sum(dim=0, keepdim=True)  # each sample column: 1/B
            q /= B
        q *= B
        return q.t()
    logq = (x / teacher_temp).t()  # (K, B): the paper's orientation
    log_k, log_b = math.log(K), math.log(max(B, 1.0))
    logq = logq - _global_logsumexp(logq, None)  # whole matrix sums to 1
    for _ in range(n_iterations):
        logq = logq - _global_logsumexp(logq, 1) - log_k  # each prototype row: 1/K (summed over workers)
        logq = logq - torch.logsumexp(logq, dim=0, keepdim=True) - log_b  # each sample column: 1/B
    return torch.exp(logq + log_b).t()


__all__ = ["sinkhorn_knopp"]
